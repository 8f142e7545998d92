# reproduce.py --preset=gpu, stage `train`: config/gpu_69m_cocomix.py's student (the paper's 69M setup)
# for 1000 steps of 0.5M tokens (0.52B tokens per method; the paper: 20B), with evaluations every 100
# steps. reproduce.py adds mode, seed, the paths, GPT-2 as concept source with OpenAI's layer-5 SAE,
# and the parameter-matched n_embd of the NTP baseline.
n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 16  # 32 * 16 * 1024 = 0.5M tokens per step
max_iters = 1000
eval_interval = 100
eval_iters = 20
learning_rate = 6e-4
dropout = 0.1  # the released recipe, as config/gpu_69m_cocomix.py
weight_decay = 0.1
decay_all = True
insert_layer = 3
concept_topk = 32
log_interval = 10
compile = True
