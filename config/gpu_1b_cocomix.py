# The paper's 1.38B setup: 24 layers, d=2048, 16 heads, insert layer 5, 1M tokens per step.
# python train.py config/gpu_1b_cocomix.py --concept_source=gpt2 \
#     --sae_path=openai:resid_post_mlp_v5_32k/5     (or local copies, as in gpu_69m_cocomix.py)
exec(open("config/gpu_69m_cocomix.py").read())
out_dir = "out/gpu_1b_cocomix"
n_layer = 24
n_head = 16
n_embd = 2048
insert_layer = 5
learning_rate = 2e-4
batch_size = 8
gradient_accumulation_steps = 128  # 8 * 128 * 1024 = 1M tokens per step
# 20B tokens, the paper's budget at this size (the 69M file's 40,000 x 0.5M would be 42B here)
max_iters = 20000
warmup_iters = 65
