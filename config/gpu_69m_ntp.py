# The NTP baseline of the paper's 69M setup: the same run, plain next-token prediction, widened
# to d=624 so parameter counts match (the paper's choice; model.ntp_matched_width gives 712 by
# our count of the CoCoMix student, see README).
# python train.py config/gpu_69m_ntp.py         (no concept source or SAE: OpenWebText alone)
exec(open("config/gpu_69m_cocomix.py").read())
out_dir = "out/gpu_69m_ntp"
mode = "ntp"
n_embd = 624
