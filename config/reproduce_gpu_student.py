# reproduce.py --preset=gpu, stage `train`: config/gpu_69m_cocomix.py's student (the paper's 69M
# setup) for 1000 steps of 0.5M tokens (0.52B tokens per method; the paper: 20B), with evaluations
# every 100 steps. reproduce.py adds mode, seed, the paths, GPT-2 as concept source with OpenAI's
# layer-5 SAE, and the parameter-matched n_embd of the NTP baseline.
exec(open("config/gpu_69m_cocomix.py").read())
max_iters = 1000
eval_interval = 100
eval_iters = 20
log_interval = 10
