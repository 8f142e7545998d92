# The NTP baseline of the paper's 386M setup: the same run, plain next-token prediction, widened to
# d=1072 (the released configuration's parameter-matched width).
# python train.py config/gpu_386m_ntp.py
exec(open("config/gpu_386m_cocomix.py").read())
out_dir = "out/gpu_386m_ntp"
mode = "ntp"
n_embd = 1072
