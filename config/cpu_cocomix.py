# CoCoMix student on CPU with our own concept source and SAE (python sae.py ... first).
# python train.py config/cpu_cocomix.py --data_dir=data/gutenberg --out_dir=out/cocomix \
#     --concept_source=out/source/ckpt.pt --sae_path=out/source/sae.pt
mode = "cocomix"
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
batch_size = 16
max_iters = 1000
eval_interval = 200
eval_iters = 20
learning_rate = 1e-3
insert_layer = 1
concept_topk = 32
k_attr = 4
lam = 0.1
