# reproduce.py --preset=cpu, stage `source`: the concept source of docs/results.md (reproduce.py
# adds seed=1337 and the paths). config/cpu_source.py's model, trained for 600 steps of 4,096 tokens
# (2.46M tokens) instead of 1000, with fewer evaluations: ~25 min on an idle 2-core CPU.
exec(open("config/cpu_source.py").read())
max_iters = 600
eval_interval = 150
eval_iters = 10
log_interval = 5
