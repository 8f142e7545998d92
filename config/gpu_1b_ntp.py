# The NTP baseline of the paper's 1.38B setup: the same run, plain next-token prediction, widened to
# d=2096 (the released configuration's parameter-matched width).
# python train.py config/gpu_1b_ntp.py
exec(open("config/gpu_1b_cocomix.py").read())
out_dir = "out/gpu_1b_ntp"
mode = "ntp"
n_embd = 2096
