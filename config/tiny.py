# A smoke-test size: seconds per run on a laptop CPU. Numbers mean nothing.
# python train.py config/tiny.py --data_dir=data/shakespeare --out_dir=out/tiny
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
batch_size = 8
max_iters = 200
eval_interval = 50
eval_iters = 10
learning_rate = 3e-3
insert_layer = 1
