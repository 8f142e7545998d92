"""
One training loop for every objective of the paper (../shared/SPEC.md sections 4-5):

    ntp      plain next-token prediction
    cocomix  next-token prediction + lam * concept loss, with concept mixing (`mix`)
    kd       next-token prediction + lam_kd * KL(p_con || p_student)
    pause    a learned vector interleaved after every token at insert_layer

Single process:   python train.py config/tiny.py --device=cpu
DDP (CPU or GPU): torchrun --standalone --nproc_per_node=2 train.py config/tiny.py

Every method with the same seed sees the same batches in the same order: the batch of
step s is drawn from a generator seeded with (seed, s), which also makes resume exact.
"""

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig, load_checkpoint

# -----------------------------------------------------------------------------
# default config: a small GPT on a laptop CPU
# I/O
out_dir = 'out'
data_dir = 'data/shakespeare'
eval_interval = 250
log_interval = 10
eval_iters = 20
eval_only = False
always_save_checkpoint = False  # False: save only when val loss improves (and always at the end)
init_from = 'scratch'  # 'scratch', 'resume', or a GPT-2 folder / 'gpt2' to fine-tune from
seed = 1337
# data
batch_size = 8
block_size = 256
gradient_accumulation_steps = 1
# model
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0
bias = True
# objective
mode = 'ntp'  # ntp | cocomix | kd | pause
concept_source = ''  # concept source / KD teacher: our ckpt.pt (or its folder) or a GPT-2 folder
sae_path = ''  # SAE file for the concept labels (ours or OpenAI's)
sae_layer = -1  # block of the concept source the SAE reads; -1 = the one stored with the SAE
n_concepts = 0  # C; 0 = the SAE's width
concept_topk = 32  # K, concepts mixed per token
insert_layer = 1  # the student's block where concepts are predicted and mixed
mix = 'interleave'  # interleave | add | none (concept prediction only)
k_attr = 4  # concept labels per token
label_rule = 'attribution'  # attribution | attribution_pre | neg_attribution | abs_attribution | activation
label_cache = True  # cocomix: keep each window's labels in data_dir (labels-*), reused by later runs; False = always computed
lam = 0.1  # concept loss weight (0 = mixing only)
lam_kd = 0.1  # KD loss weight
# AdamW, warmup then cosine to min_lr
learning_rate = 1e-3
max_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = -1  # -1 = max_iters // 300, the paper's 1/300 of the steps (at least 10)
lr_decay_iters = -1  # -1 = max_iters
min_lr = -1.0  # -1 = learning_rate / 10
# system
device = 'auto'  # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'  # auto | float32 | bfloat16 | float16
compile = False
backend = 'auto'  # DDP backend: nccl on CUDA, gloo on CPU
progress = True  # tqdm progress bar
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- checks that cost nothing, before any work
if mode not in ('ntp', 'cocomix', 'kd', 'pause'):
    fail(f"mode must be ntp, cocomix, kd or pause, got {mode!r}")
if min(batch_size, block_size, gradient_accumulation_steps, max_iters + 1) <= 0:
    fail("batch_size, block_size and gradient_accumulation_steps must be positive, max_iters non-negative")
if mode in ('cocomix', 'kd') and not concept_source:
    fail(f"mode={mode} needs --concept_source (a checkpoint of ours or a GPT-2 folder)")
if mode == 'cocomix' and not sae_path:
    fail("mode=cocomix needs --sae_path (an SAE trained by sae.py, or OpenAI's)")
warmup_iters = warmup_iters if warmup_iters >= 0 else max(10, max_iters // 300)
lr_decay_iters = lr_decay_iters if lr_decay_iters > 0 else max_iters
min_lr = min_lr if min_lr >= 0 else learning_rate / 10

# ---- processes, device and precision
ddp = int(os.environ.get('RANK', -1)) != -1
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
if ddp:
    if backend == 'auto':
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
    init_process_group(backend=backend)
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the {world_size} processes")
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if dtype == 'auto':
    if device_type == 'cuda':
        dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    elif device_type == 'cpu' and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtype = 'bfloat16'  # only where the CPU has native bf16 (AVX512-BF16/AMX); emulated bf16 is slower than fp32
    else:
        dtype = 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# ---- data: uint16 token files written by prepare.py
for split in ('train', 'val'):
    if not os.path.exists(os.path.join(data_dir, f'{split}.bin')):
        fail(f"{data_dir}/{split}.bin not found: prepare a corpus first, e.g. python prepare.py --input FILES --out_dir {data_dir}")
meta_path = os.path.join(data_dir, 'meta.json')
meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {'tokenizer': 'gpt2', 'vocab_size': 50257}
if meta.get('tokenizer', 'gpt2') != 'gpt2':
    fail(f"{data_dir} was prepared with tokenizer {meta['tokenizer']!r}; this project trains on GPT-2 BPE")
vocab_size = 50257
if meta.get('vocab_size', vocab_size) != vocab_size:
    fail(f"{data_dir} was prepared with vocab_size {meta['vocab_size']}, the model uses GPT-2's {vocab_size}")
for s in ('train', 'val'):
    if os.path.getsize(os.path.join(data_dir, f'{s}.bin')) % 2:
        fail(f"{data_dir}/{s}.bin has an odd number of bytes: not a file of uint16 tokens written by prepare.py")
data = {s: np.memmap(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16, mode='r') for s in ('train', 'val')}
for s, d in data.items():
    if len(d) <= block_size + 1:
        fail(f"{data_dir}/{s}.bin holds {len(d)} tokens, fewer than block_size+1 = {block_size + 1}")
    if d[:1_000_000].max() >= vocab_size:  # garbage or another tokenizer's ids
        fail(f"{data_dir}/{s}.bin holds token ids >= {vocab_size}: not GPT-2 BPE tokens")
micro_batches = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size


def batch_offsets(split, step):
    """Window starts for the whole global batch of `step`: a pure function of (seed, step). Windows lie
    on a fixed grid (multiples of block_size), so anything computed per window, such as concept labels,
    can be cached and reused by every run that sees the same window."""
    rng = np.random.default_rng([seed, step, 0 if split == 'train' else 1])
    n_windows = (len(data[split]) - 1) // block_size  # window w holds tokens [w T, w T + T + 1)
    return rng.integers(0, n_windows, size=gradient_accumulation_steps * batch_size) * block_size


def get_batch(split, step, micro):
    """This process's micro-batch `micro` of the global batch of `step` (rank r takes micro-batches r, r+W, ...):
    x, y and where they came from, (split, window indices), for the label cache."""
    m = micro * world_size + rank
    ix = batch_offsets(split, step)[m * batch_size:(m + 1) * batch_size]
    d = data[split]
    x = torch.from_numpy(np.stack([d[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([d[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    where = (split, ix // block_size)
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True), where
    return x.to(device), y.to(device), where


# ---- concept source, SAE and labels
source, labeler, label_caches = None, None, {}
if mode in ('cocomix', 'kd'):
    from concepts import ConceptLabeler, LabelCache, label_identity
    from model import load_frozen_gpt
    try:
        source = load_frozen_gpt(concept_source, device)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    if source.config.vocab_size != vocab_size:
        fail(f"concept source {concept_source} has vocab {source.config.vocab_size}, the data is GPT-2 BPE ({vocab_size})")
    if source.config.block_size < block_size:
        fail(f"block_size={block_size} is longer than the concept source's context ({source.config.block_size})")
if mode == 'cocomix':
    from sae import SAE
    try:
        sae = SAE.load(sae_path, layer=sae_layer if sae_layer >= 0 else None).to(device)
        if sae.meta.get('layer') is None:
            fail(f"{sae_path} does not say which layer it was trained on: pass --sae_layer")
        sae_layer = sae.meta['layer']
        labeler = ConceptLabeler(source, sae, sae_layer, k_attr, label_rule)
    except (OSError, ValueError) as e:
        fail(str(e))
    n_concepts = n_concepts or sae.n_latents
    if n_concepts != sae.n_latents:
        fail(f"n_concepts={n_concepts} but the SAE has {sae.n_latents} latents")
    if label_cache:  # one cache per token file; eval windows are fixed, so they hit from the second eval on
        try:
            identity = label_identity(labeler, concept_source, sae.path, dtype)
            label_caches = {s: LabelCache(labeler, data_dir, s, block_size, identity) for s in ('train', 'val')}
        except ValueError as e:
            fail(str(e))
        except OSError as e:  # e.g. a read-only data_dir: slower, not wrong
            print(f"warning: label cache off ({e}); labels are computed for every batch", file=sys.stderr)

# ---- model
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=vocab_size, dropout=dropout)
if mode == 'cocomix':
    model_args.update(n_concepts=n_concepts, concept_topk=concept_topk, insert_layer=insert_layer, mix=mix)
elif mode == 'pause':
    model_args.update(insert_layer=insert_layer, mix='pause')
torch.manual_seed(seed)  # the same initial weights on every process; dropout streams differ below
iter_num, best_val_loss, checkpoint = 0, 1e9, None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"--init_from=resume but {ckpt_path} does not exist")
    try:
        model, checkpoint = load_checkpoint(ckpt_path)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    changed = {k: (checkpoint['model_args'].get(k), v) for k, v in model_args.items() if checkpoint['model_args'].get(k) != v}
    old = checkpoint.get('config', {})
    changed.update({k: (old[k], config[k]) for k in ('mode', 'label_rule', 'concept_source', 'sae_path', 'seed')
                    if k in old and old[k] != config[k]})
    if changed:
        fail(f"resume config disagrees with {ckpt_path}: " + ", ".join(f"{k}={b!r} (checkpoint: {a!r})" for k, (a, b) in changed.items()))
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
elif init_from == 'scratch':
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        fail(str(e))
else:
    model = GPT.from_pretrained(init_from, dropout=dropout)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
model.to(device)
torch.manual_seed(seed + rank)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    rng = checkpoint['rng']
    torch.set_rng_state(rng['torch'])
    random.setstate(rng['python'])
    name, keys, pos, has_gauss, cached = rng['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if rng.get('cuda') is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'])
checkpoint = None
raw_model = model
if compile:
    model = torch.compile(model)
eval_model = model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def lr_at(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


timing = {'source': 0.0, 'student': 0.0}  # the cost split reported at each eval


def step_loss(X, Y, where, net=None):
    """Loss of one micro-batch (from get_batch) under the objective; returns (loss, aux)."""
    net = model if net is None else net
    t0 = time.perf_counter()
    labels, teacher = None, None
    if mode == 'cocomix':
        with ctx:
            split, windows = where
            labels = label_caches[split].labels(windows, X, Y) if label_caches else labeler(X, Y)
    elif mode == 'kd':
        with torch.no_grad(), ctx:  # the teacher's final hidden state and head: its logits are made in chunks
            teacher = source.as_teacher(X)
    t1 = time.perf_counter()
    with ctx:
        # the LM head's loss (and KD's KL) in chunks, without the B x T x V logits
        _, loss, aux = net(X, Y, concept_labels=labels, lam=lam, teacher=teacher, lam_kd=lam_kd, return_aux=True,
                           return_logits=False)
    timing['source'] += t1 - t0
    timing['student'] += time.perf_counter() - t1
    return loss, aux


# per-token UTF-8 byte lengths, for bits per byte (<|endoftext|> is not text: 0 bytes)
try:
    import tiktoken
    _enc = tiktoken.get_encoding('gpt2')
    token_bytes = torch.tensor([len(_enc.decode_single_token_bytes(i)) for i in range(vocab_size - 1)] + [0])
except Exception:  # no tokenizer files: bits per byte is left out
    token_bytes = None


@torch.no_grad()
def evaluate():
    """Loss on fixed windows of both splits (the same windows for every method and seed)."""
    out = {}
    net = eval_model  # never the DDP wrapper: only rank 0 evaluates, and DDP's forward may talk to the others
    net.eval()
    for split in ('train', 'val'):
        sums = {}
        nbytes, ntok = 0, 0
        for k in range(eval_iters):
            X, Y, where = get_batch(split, 10_000_000 + k, 0)  # steps no training run reaches: fixed eval windows
            loss, aux = step_loss(X, Y, where, net)
            for key in ('ntp', 'concept', 'recall', 'kd'):
                if key in aux:
                    sums[key] = sums.get(key, 0.0) + aux[key].item()
            if token_bytes is not None:
                nbytes += token_bytes[Y.cpu()].sum().item()
                ntok += Y.numel()
        means = {k: v / eval_iters for k, v in sums.items()}
        out[f'{split}/loss'] = means.pop('ntp')
        out.update({f'{split}/{k}': v for k, v in means.items()})
        if nbytes:
            out[f'{split}/bpb'] = out[f'{split}/loss'] * ntok / nbytes / math.log(2)
    out['val/ppl'] = math.exp(min(out['val/loss'], 50))
    net.train()
    return out


def save_checkpoint():
    """Atomic: write a temporary file, then rename, so a crash keeps the previous checkpoint."""
    sd = raw_model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
        print(f"warning: step {iter_num}: parameters are not finite, checkpoint not written", file=sys.stderr)
        return
    ckpt = {'model': sd, 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config,
            'rng': {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy': numpy_rng_state(),
                    'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}}
    tmp = ckpt_path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, ckpt_path)


def numpy_rng_state():
    # as plain Python values, so the checkpoint loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def log(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


# a SIGINT/SIGTERM finishes the current step, saves a checkpoint and exits
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

if master:
    os.makedirs(out_dir, exist_ok=True)
    nparams = raw_model.get_num_params()
    print(f"mode={mode} params={nparams / 1e6:.2f}M device={device} dtype={dtype} world={world_size} "
          f"tokens/iter={tokens_per_iter:,}")
pbar = None
if master and progress and not eval_only:
    from tqdm import tqdm
    pbar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, file=sys.stdout)
t_start = time.time()
skipped = 0
last_logged = None
while True:
    lr = lr_at(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and master:
        metrics = evaluate()
        record = {'iter': iter_num, 'tokens': iter_num * tokens_per_iter, 'lr': lr, 'time': time.time() - t_start,
                  'time_source': timing['source'], 'time_student': timing['student'], **metrics}
        msg = f"step {iter_num}: train {metrics['train/loss']:.4f}, val {metrics['val/loss']:.4f}"
        if 'val/concept' in metrics:
            msg += f", concept {metrics['val/concept']:.3f}, recall {metrics['val/recall']:.3f}"
        if label_caches:  # windows so far (this process) whose labels came from disk / were computed
            record['label_hits'] = sum(c.hits for c in label_caches.values())
            record['label_computed'] = sum(c.misses for c in label_caches.values())
            msg += f", labels cached {record['label_hits']}/{record['label_hits'] + record['label_computed']}"
        log(record)
        (pbar.write if pbar else print)(msg)
        improved = metrics['val/loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val/loss'])
        if iter_num > 0 and (improved or always_save_checkpoint) and not eval_only:
            save_checkpoint()
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step over the global batch of this step
    loss_sum, parts = 0.0, {}
    for micro in range(micro_batches):
        X, Y, where = get_batch('train', iter_num, micro)
        if ddp:  # sync gradients only on the last micro-batch
            model.require_backward_grad_sync = micro == micro_batches - 1
        loss, aux = step_loss(X, Y, where)
        loss = loss / micro_batches
        scaler.scale(loss).backward()
        loss_sum += loss.item()
        for key in ('ntp', 'concept', 'recall', 'kd'):  # logged as means over the micro-batches
            if key in aux:
                parts[key] = parts.get(key, 0.0) + aux[key].item() / micro_batches
    if ddp:  # the mean over all processes, so every rank takes the same skip decision
        t = torch.tensor(loss_sum, device=device)
        torch.distributed.all_reduce(t)
        loss_sum = t.item() / world_size
    if grad_clip:
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        gnorm = torch.tensor(0.0)
    if not (math.isfinite(loss_sum) and torch.isfinite(gnorm)) and dtype != 'float16':
        # fp16's scaler handles its own overflows; anywhere else a non-finite step is skipped
        skipped += 1
        (pbar.write if pbar else print)(f"warning: step {iter_num}: non-finite loss or gradients, step skipped")
        optimizer.zero_grad(set_to_none=True)
        if skipped >= 10:
            fail(f"step {iter_num}: 10 non-finite steps; stopping (lower learning_rate or check the data)")
        iter_num += 1
        continue
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if master:
        record = {'iter': iter_num, 'loss': loss_sum, 'lr': lr}
        record.update(parts)
        if iter_num % log_interval == 0:
            log({'train_step': iter_num, **record})
        if pbar:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
    if stop_requested:
        if master:
            save_checkpoint()
            print(f"stopped at step {iter_num}; checkpoint saved to {ckpt_path}, resume with --init_from=resume")
        break

if master and not eval_only and not stop_requested:
    save_checkpoint()
if pbar:
    pbar.close()
if ddp:
    destroy_process_group()
