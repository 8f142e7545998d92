# The offline concept source: a small GPT trained with plain next-token prediction on the
# corpus the students will see (docs/method.md, "the offline default").
# python train.py config/cpu_source.py --data_dir=data/gutenberg --out_dir=out/source
mode = "ntp"
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
batch_size = 16
max_iters = 1000
eval_interval = 200
eval_iters = 20
learning_rate = 1e-3
