# reproduce.py --preset=cpu, stage `train`: what the four students of docs/results.md share.
# config/cpu_cocomix.py's student for 72 steps of 4,096 tokens (295k tokens) instead of 1000;
# reproduce.py --set max_iters=576 eval_interval=72 gives the longer runs. reproduce.py adds mode,
# seed, the paths, the concept source and SAE, and the parameter-matched n_embd of the NTP baseline.
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
batch_size = 16
max_iters = 72
eval_interval = 18
eval_iters = 4
learning_rate = 1e-3
insert_layer = 1
concept_topk = 32
log_interval = 2
