# A concept source clearly stronger than the cpu students (docs/results.md, "a stronger source"):
# config/cpu_source.py's model trained on one pass over the Gutenberg training split (3,400 steps
# of 4,096 tokens = 13.9M tokens) instead of 600 steps. ~1 h on an idle 2-core CPU; resumable:
# python train.py config/cpu_source_strong.py --data_dir=DATA --out_dir=out/strong_source
# [--init_from=resume]
exec(open("config/cpu_source.py").read())
max_iters = 3400
eval_interval = 200
eval_iters = 20
log_interval = 10
