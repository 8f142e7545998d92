# The paper's 386M setup: 24 layers, d=1024, 16 heads, insert layer 5.
# python train.py config/gpu_386m_cocomix.py --concept_source=gpt2 \
#     --sae_path=openai:resid_post_mlp_v5_32k/5     (or local copies, as in gpu_69m_cocomix.py)
exec(open("config/gpu_69m_cocomix.py").read())
out_dir = "out/gpu_386m_cocomix"
n_layer = 24
n_head = 16
n_embd = 1024
insert_layer = 5
learning_rate = 3e-4
batch_size = 16
gradient_accumulation_steps = 32
