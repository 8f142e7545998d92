# The paper's 69M setup: 8 layers, d=512, insert layer 3, GPT-2 124M as the
# concept source with OpenAI's layer-5 32k SAE, OpenWebText, 0.5M tokens per step.
# pip install datasets && python prepare.py --source openwebtext --out_dir data/openwebtext
# python train.py config/gpu_69m_cocomix.py --concept_source=gpt2 \
#     --sae_path=openai:resid_post_mlp_v5_32k/5
# gpt2 and openai:... download when online (to ~/.cache/cocomix). Offline, give local copies:
# --concept_source=DIR (a Hugging Face GPT-2 folder: config.json, model.safetensors) and
# --sae_path=FILE (OpenAI's 5.pt of resid_post_mlp_v5_32k); README, "The paper's setup on one GPU".
data_dir = "data/openwebtext"
out_dir = "out/gpu_69m_cocomix"
mode = "cocomix"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 16  # 32 * 16 * 1024 = 0.5M tokens per step
insert_layer = 3
sae_layer = 5
concept_topk = 32
k_attr = 4
lam = 0.1
learning_rate = 6e-4
max_iters = 40000  # 20B tokens, the paper's budget; lower it for an affordable run
warmup_iters = 130
eval_interval = 1000
eval_iters = 100
# The released recipe: its students are GPT-2 configurations with only widths and depths changed, so
# GPT-2's dropout of 0.1 (attention, residual, embedding) is on, and AdamW decays every parameter.
dropout = 0.1
weight_decay = 0.1
decay_all = True
# Its loader sees every window once per epoch: so does data_order = "epoch" (train.py)
data_order = "epoch"
compile = True
