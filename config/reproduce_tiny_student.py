# reproduce.py --preset=tiny, stage `train`: what the four students share. reproduce.py adds mode,
# seed, the paths, the concept source and SAE, and the parameter-matched n_embd of the NTP baseline.
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
batch_size = 4
max_iters = 40
eval_interval = 10
eval_iters = 2
learning_rate = 3e-3
insert_layer = 1
concept_topk = 8
log_interval = 2
