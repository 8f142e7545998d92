# reproduce.py --preset=tiny, stage `source`: the concept source of the smoke test (reproduce.py
# adds seed=1337 and the paths). Smaller and shorter than config/tiny.py: the whole pipeline runs in
# ~2-3 minutes on a loaded 2-core CPU. The numbers mean nothing.
mode = "ntp"
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
batch_size = 4
max_iters = 60
eval_interval = 30
eval_iters = 2
learning_rate = 3e-3
log_interval = 5
