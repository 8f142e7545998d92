"""
One training loop for every objective of the paper (docs/method.md, "The objective"):

    ntp      next-token prediction
    cocomix  next-token prediction + lam * L_concept, the predicted concepts mixed back (`mix`)
    kd       next-token prediction + lam_kd * KL(p_teacher || p_student), the source as teacher
    pause    a learned vector after every token from insert_layer on (CoCoMix's shape, no concepts)

The loss of every mode is model.training_loss; the concept labels come from sae.ConceptLabeler,
read through the on-disk label cache when a window was labelled before.

    python train.py config/tiny.py --device=cpu                          # one process
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py     # DDP, CPU or GPU

Every method with the same seed sees the same batches in the same order: the batch of step s is
a pure function of (seed, s) (drawn from a generator seeded with them, or with data_order='epoch'
read from the permutation of its epoch), which also makes resume exact.
"""

import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

from cocomix.interrupt import on_ctrl_c

on_ctrl_c("the run had not started; nothing was written")  # until the training loop's handler

import numpy as np
import torch
from torch.distributed import destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

# VOCAB_SIZE not imported by name: every int or str global is a setting
import cocomix.corpus as corpus
from cocomix.checks import check_config, check_memory, check_resume, check_source, input_hashes
from cocomix.corpus import load_tokens, token_byte_lengths
from cocomix.progress import progress_bar
from cocomix.runtime import (
    auto_device,
    auto_dtype,
    hold_lock,
    init_processes,
    keep_freed_memory,
    label_cache_note,
    load_optimizer_state,
    rng_state,
    set_rng_state,
    to_device,
    trim_log,
)
from cocomix.tracking import start_run
from cocomix.weights import first_line, save_atomic
from model import GPT, GPTConfig, Objective, load_checkpoint, load_frozen_gpt, teacher_of
from sae import check_sae_host, make_labeler

# -----------------------------------------------------------------------------
# default config: a small GPT on a laptop CPU
# I/O
out_dir = "out"
data_dir = "data/shakespeare"
eval_interval = 250
log_interval = 10
eval_iters = 20
eval_only = False
always_save_checkpoint = False  # False: save only when val loss improves (and always at the end)
init_from = "scratch"  # 'scratch', 'resume', or a GPT-2 folder / 'gpt2' to fine-tune from
seed = 1337
# data
batch_size = 8
block_size = 256
gradient_accumulation_steps = 1
# random: each step's windows drawn afresh (the CPU presets' published runs) | epoch: every window
# once per epoch, in a permutation drawn from (seed, epoch), as the released code's loader
data_order = "random"
# model
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0
bias = True
# objective
mode = "ntp"  # ntp | cocomix | kd | pause
concept_source = ""  # concept source / KD teacher: our ckpt.pt (or its folder) or a GPT-2 folder
sae_path = ""  # SAE file for the concept labels (ours or OpenAI's)
sae_layer = -1  # block of the concept source the SAE reads; -1 = the one stored with the SAE
n_concepts = 0  # C; 0 = the SAE's width
concept_topk = 32  # K, concepts mixed per token
insert_layer = 1  # the student's block where concepts are predicted and mixed
mix = "interleave"  # interleave | add | none (concept prediction only)
k_attr = 4  # concept labels per token
label_rule = (
    "attribution"  # attribution | attribution_pre | neg_attribution | abs_attribution | activation
)
# labels a token lacks when fewer than k_attr latents score > 0: none (-1) | active | released
label_fill = "none"
# cocomix: keep each window's labels in data_dir (labels-*), reused by later runs; False = always
# computed
label_cache = True
lam = 0.1  # concept loss weight (0 = mixing only)
lam_kd = 0.1  # KD loss weight
# AdamW, warmup then cosine to min_lr
learning_rate = 1e-3
max_iters = 2000
weight_decay = 1e-1
decay_all = (
    False  # True: weight decay on every parameter (the released recipe), not only on matrices
)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = -1  # -1 = max_iters // 300, the paper's 1/300 of the steps (at least 10)
lr_decay_iters = -1  # -1 = max_iters
min_lr = -1.0  # -1 = learning_rate / 10
# system
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = False
backend = "auto"  # DDP backend: nccl on CUDA, gloo on CPU
# CPU with glibc: large tensors from the heap, not fresh page-faulted mappings (~1.4x faster steps)
cpu_heap = True
# Weights & Biases (pip install wandb): every record of log.jsonl also logged to a W&B run
wandb_log = False
wandb_project = "cocomix"
wandb_run_name = ""  # '' = out_dir's name
# tqdm's bar on a terminal; in a file or a pipe, a plain line every log_interval steps
progress = True
# -----------------------------------------------------------------------------
config_keys = [
    k
    for k, v in globals().items()
    if not k.startswith("_") and isinstance(v, (int, float, bool, str))
]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# every setting is checked before any work, so a typo costs a second, not a loaded model
if problem := check_config(config):
    fail(problem)
warmup_iters = warmup_iters if warmup_iters >= 0 else max(10, max_iters // 300)
lr_decay_iters = lr_decay_iters if lr_decay_iters > 0 else max_iters
min_lr = min_lr if min_lr >= 0 else learning_rate / 10

# -----------------------------------------------------------------------------
# processes, device and precision
try:
    device = auto_device(device)
    ddp, rank, local_rank, world_size, device = init_processes(
        device, backend, gradient_accumulation_steps
    )
except ValueError as e:
    fail(str(e))
master = rank == 0
# one run per out_dir: a second would overwrite this one's checkpoints and interleave its log
if master:
    try:
        hold_lock(os.path.join(out_dir, "lock"))
    except RuntimeError as e:
        fail(str(e))
device_type = "cuda" if "cuda" in device else "mps" if "mps" in device else "cpu"
dtype = auto_dtype(dtype, device_type)
# on a CPU with glibc, a third of a step went to the kernel mapping fresh pages for large tensors
if cpu_heap:
    keep_freed_memory(device)
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: the uint16 token files written by prepare.py
try:
    data = {s: load_tokens(data_dir, s, block_size + 2, "block_size+2") for s in ("train", "val")}
except (OSError, ValueError) as e:
    fail(str(e))
micro_batches = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size


EVAL_STEP = 10_000_000  # evaluation batches are those of steps from here on, which no run reaches


def batch_offsets(split, step):
    """Window starts for the whole global batch of `step`: a pure function of (seed, step). Windows
    lie on a fixed grid (multiples of block_size), so anything computed per window, such as concept
    labels, can be cached and reused by every run that sees the same window. With data_order='epoch'
    training reads the windows in epochs: the i-th window of the run is window i mod n of epoch
    i // n's permutation."""
    n_windows = (len(data[split]) - 1) // block_size  # window w holds tokens [w T, w T + T + 1)
    size = gradient_accumulation_steps * batch_size
    if data_order == "epoch" and split == "train" and step < EVAL_STEP:
        epoch, i = np.divmod(step * size + np.arange(size), n_windows)
        return np.array([epoch_order(e, n_windows)[j] for e, j in zip(epoch, i)]) * block_size
    rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
    return rng.integers(0, n_windows, size=size) * block_size


@functools.lru_cache(maxsize=2)  # this epoch and, across its end, the next
def epoch_order(epoch, n_windows):
    return np.random.default_rng([seed, epoch, 2]).permutation(n_windows)


def get_batch(split, step, micro):
    """This process's micro-batch `micro` of the global batch of `step` (rank r takes micro-batches
    r, r+W, ...): x, y and where they came from, (split, window indices, x and y in host memory),
    for the label cache."""
    m = micro * world_size + rank
    ix = batch_offsets(split, step)[m * batch_size : (m + 1) * batch_size]
    d = data[split]
    x = torch.from_numpy(np.stack([d[i : i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([d[i + 1 : i + 1 + block_size].astype(np.int64) for i in ix]))
    # the host copies go along: the label cache hashes them without a read back from the device
    return to_device(x, device), to_device(y, device), (split, ix // block_size, x, y)


# -----------------------------------------------------------------------------
# the concept source (KD: the teacher), the SAE and the concept labeler (sae.py)
source, labeler, label_caches = None, None, {}
if mode in ("cocomix", "kd"):
    try:
        source = load_frozen_gpt(concept_source, device)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    if problem := check_source(source, corpus.VOCAB_SIZE, block_size, concept_source):
        fail(problem)
if mode == "cocomix":
    try:
        labeler, n_concepts = make_labeler(
            source, sae_path, sae_layer, k_attr, label_rule, label_fill, n_concepts, device
        )
        check_sae_host(labeler.sae, concept_source)
    except (OSError, ValueError) as e:
        fail(str(e))
# a step that cannot fit in memory is refused here, naming its settings, not by the allocator later
# (on CUDA from an estimate that counts the source and SAE, already there, and the student, not yet)
source_shape = None if source is None else (source.config.n_layer, source.config.n_embd)
if problem := check_memory(config, corpus.VOCAB_SIZE, device, source_shape, n_concepts, world_size):
    fail(problem)
# the SHA-256 of the files behind the paths, which a resume checks
inputs = input_hashes(
    data_dir,
    concept_source if source is not None else None,
    labeler.sae.path if labeler is not None else None,
)

# -----------------------------------------------------------------------------
# the model: from scratch, resumed, or GPT-2's weights
model_args = dict(
    n_layer=n_layer,
    n_head=n_head,
    n_embd=n_embd,
    block_size=block_size,
    bias=bias,
    vocab_size=corpus.VOCAB_SIZE,
    dropout=dropout,
)
if mode == "cocomix":
    model_args.update(
        n_concepts=n_concepts, concept_topk=concept_topk, insert_layer=insert_layer, mix=mix
    )
elif mode == "pause":
    model_args.update(insert_layer=insert_layer, pause=True)
torch.manual_seed(seed)  # the same initial weights on every process; dropout streams differ below
iter_num, best_val_loss, checkpoint = 0, 1e9, None
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":
    try:
        model, checkpoint = load_checkpoint(ckpt_path)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"--init_from=resume: {e}")
    if problem := check_resume(checkpoint, model_args, config, ckpt_path, inputs):
        fail(problem)
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
elif init_from == "scratch":
    try:
        model = GPT(GPTConfig(**model_args))
    except (
        ValueError,
        RuntimeError,
        MemoryError,
    ) as e:  # the settings, or an allocation that failed
        fail(f"n_embd={n_embd}, n_layer={n_layer}: {first_line(e) or 'out of memory'}")
else:
    try:
        model = GPT.from_pretrained(init_from, dropout=dropout)
    except (OSError, ValueError, RuntimeError) as e:  # offline, or not a GPT-2 folder
        fail(f"--init_from={init_from}: {e}")
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
# the log keeps the steps before this run's start (none from scratch); the rest it logs again
if master:
    trim_log(os.path.join(out_dir, "log.jsonl"), iter_num)
model.to(device)
torch.manual_seed(seed + rank)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(
    weight_decay, learning_rate, (beta1, beta2), device_type, decay_all=decay_all
)
if checkpoint is not None:
    load_optimizer_state(optimizer, checkpoint["optimizer"])  # with this run's betas, weight_decay
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], device_type)
checkpoint = None
# a window's labels are computed once and read from data_dir after (cocomix/label_cache.py); opened
# only now, after every check, so that a refused run leaves no labels-* files
if labeler is not None and label_cache:
    from cocomix.label_cache import open_label_caches

    try:
        label_caches = open_label_caches(
            labeler, data_dir, block_size, concept_source, labeler.sae.path, dtype
        )
    except ValueError as e:
        fail(str(e))

# -----------------------------------------------------------------------------
# the loss (model.training_loss) as one module, wrapped for DDP and torch.compile
raw_model = model
# evaluation never goes through DDP's wrapper, whose forward may talk to the other ranks
objective = eval_objective = Objective(model, mode, lam, lam_kd)
if ddp:
    device_ids = [local_rank] if device_type == "cuda" else None
    objective = ddp_objective = DDP(objective, device_ids=device_ids)
# compiled after DDP, as PyTorch advises: the graph is then split at DDP's gradient buckets, so
# that each bucket's all-reduce overlaps with the backward of the layers below it
if compile:
    objective = torch.compile(objective)
    eval_objective = torch.compile(eval_objective) if ddp else objective
timing = {"source": 0.0, "student": 0.0}  # the cost split reported at each eval


def step_loss(X, Y, where, net):
    """(loss, parts) of one micro-batch of get_batch: the labels or teacher, then the student."""
    t0 = time.perf_counter()
    labels, teacher = None, None
    with ctx:
        if mode == "cocomix":
            split, windows, x_host, y_host = where
            if label_caches:
                labels = label_caches[split].labels(windows, x_host, y_host, X.device)
            else:
                labels = labeler(X, Y)
        elif mode == "kd":
            with torch.no_grad():
                teacher = teacher_of(source, X)
        t1 = time.perf_counter()
        loss, parts = net(X, Y, labels, teacher)
    timing["source"] += t1 - t0
    timing["student"] += time.perf_counter() - t1
    return loss, parts


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


# per-token UTF-8 byte lengths, for bits per byte; without the tokenizer's files bpb is left out
try:
    token_bytes = torch.from_numpy(token_byte_lengths())
except Exception:
    token_bytes = None


@torch.no_grad()
def evaluate():
    """Mean losses on fixed windows of both splits (the same windows for every method with the
    same seed): steps no training run reaches name them."""
    out = {}
    eval_objective.eval()
    for split in ("train", "val"):
        sums, nbytes, ntok = {}, 0, 0
        for k in range(eval_iters):
            X, Y, where = get_batch(split, EVAL_STEP + k, 0)
            _, parts = step_loss(X, Y, where, eval_objective)
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + v.item()
            if token_bytes is not None:
                nbytes += token_bytes[Y.cpu()].sum().item()
                ntok += Y.numel()
        means = {k: v / eval_iters for k, v in sums.items()}
        out[f"{split}/loss"] = means.pop("ntp")
        out.update({f"{split}/{k}": v for k, v in means.items()})
        if nbytes:
            out[f"{split}/bpb"] = out[f"{split}/loss"] * ntok / nbytes / math.log(2)
    out["val/ppl"] = math.exp(min(out["val/loss"], 50))
    eval_objective.train()
    return out


saved = [iter_num, best_val_loss]  # what ckpt.pt holds (a resume's checkpoint, or nothing yet)


def save_checkpoint(why=""):
    """Atomic: write a temporary file, then rename, so a crash keeps the previous checkpoint. A
    failed write ends the run with `why` and its reason."""
    sd = raw_model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
        msg = f"warning: step {iter_num}: parameters are not finite, checkpoint not written"
        print(msg, file=sys.stderr)
        return
    ckpt = {
        "model": sd,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "inputs": inputs,
        "rng": rng_state(device_type),
    }
    try:
        save_atomic(ckpt, ckpt_path)
    except OSError as e:  # a full disk: the previous checkpoint stays, and the run stops unsaved
        fail(f"{why}{e}")
    saved[:] = [iter_num, best_val_loss]


def log(record):
    if track:
        track(record)
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk or a removed out_dir: the steps so far are saved first
        if saved[0] != iter_num:
            save_checkpoint(why=f"cannot write {path} ({e.strerror or e}), and ")
        fail(f"cannot write {path} ({e.strerror or e}); {ckpt_path} holds step {iter_num}")


# -----------------------------------------------------------------------------
# training

# SIGINT/SIGTERM: finish the current step, save a checkpoint, exit
stop_requested = []
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda signum, frame: stop_requested.append(signum))
if master:
    os.makedirs(out_dir, exist_ok=True)
    params = raw_model.get_num_params() / 1e6
    print(
        f"mode={mode} params={params:.2f}M device={device} dtype={dtype} world={world_size} "
        f"tokens/iter={tokens_per_iter:,}"
    )
track = None  # with wandb_log, log() sends each record to a W&B run too (cocomix/tracking.py)
if wandb_log and master:
    track = start_run(out_dir, wandb_project, wandb_run_name, config, init_from == "resume")
pbar = None
if master and progress and not eval_only:
    pbar = progress_bar(
        total=max_iters,
        initial=iter_num,
        desc="step",
        dynamic_ncols=True,
        file=sys.stdout,
        every=log_interval,
    )
say = pbar.write if pbar else print
t_start, skipped_in_a_row, stop = time.time(), 0, False
while True:
    lr = lr_at(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # the last step is saved before its evaluation, so that a kill during that keeps the steps
    if iter_num == max_iters and master and not eval_only and saved[0] != iter_num:
        save_checkpoint()
    # evaluate, log and save the best checkpoint so far
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and master:
        metrics = evaluate()
        record = {
            "iter": iter_num,
            "tokens": iter_num * tokens_per_iter,
            "lr": lr,
            "time": time.time() - t_start,
            "time_source": timing["source"],
            "time_student": timing["student"],
            **metrics,
        }
        msg = f"step {iter_num}: train {metrics['train/loss']:.4f}, val {metrics['val/loss']:.4f}"
        if "val/concept" in metrics:
            msg += f", concept {metrics['val/concept']:.3f}, recall {metrics['val/recall']:.3f}"
        msg += label_cache_note(label_caches, record)
        log(record)
        say(msg)
        improved = metrics["val/loss"] < best_val_loss
        best_val_loss = min(best_val_loss, metrics["val/loss"])
        if 0 < iter_num < max_iters and (improved or always_save_checkpoint) and not eval_only:
            save_checkpoint()
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step over the global batch of this step. The sums stay on the device and are
    # read once, after the step's backward: a read per micro-batch would make the GPU wait each time
    sums = {}
    for micro in range(micro_batches):
        X, Y, where = get_batch("train", iter_num, micro)
        if ddp:  # sync gradients only on the last micro-batch
            ddp_objective.require_backward_grad_sync = micro == micro_batches - 1
        loss, parts = step_loss(X, Y, where, objective)
        scaler.scale(loss / micro_batches).backward()
        for key, v in {"loss": loss.detach(), **parts}.items():  # means over the micro-batches
            sums[key] = sums.get(key, 0.0) + v.float() / micro_batches
    if ddp:  # the mean over all processes, so every rank takes the same skip decision; with it,
        # whether any process was asked to stop (SIGINT, SIGTERM), so that all stop after the same
        # step: one leaving alone would leave the others waiting in their next all-reduce
        sums["stop"] = torch.full((), float(bool(stop_requested)), device=device)
        both = torch.stack([sums["loss"], sums["stop"]])
        torch.distributed.all_reduce(both)
        sums["loss"], sums["stop"] = both[0] / world_size, both[1]
    gnorm = torch.zeros((), device=device)
    if grad_clip:
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    gnorm, *values = torch.stack([gnorm.float(), *sums.values()]).tolist()  # the one host sync
    parts_sum = dict(zip(sums, values))
    loss_sum = parts_sum.pop("loss")
    stop = parts_sum.pop("stop") > 0 if ddp else bool(stop_requested)
    iter_num += 1
    # fp16's scaler handles its own overflows; anywhere else a non-finite step is skipped, and ten
    # in a row stop the run
    if not (math.isfinite(loss_sum) and math.isfinite(gnorm)) and dtype != "float16":
        skipped_in_a_row += 1
        say(f"warning: step {iter_num - 1}: non-finite loss or gradients, step skipped")
        optimizer.zero_grad(set_to_none=True)
        if skipped_in_a_row >= 10:
            fail(
                f"step {iter_num - 1}: 10 non-finite steps in a row; stopping "
                "(lower learning_rate or check the data)"
            )
        continue
    skipped_in_a_row = 0
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    if master:
        if iter_num % log_interval == 0:
            log({"train_step": iter_num, "loss": loss_sum, "lr": lr, **parts_sum})
        if pbar:
            pbar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            pbar.update(1)
    if stop:
        break

# the last step's checkpoint, whether the run ended or was stopped (again at the end when the final
# evaluation lowered best_val_loss)
if master and not eval_only:
    if saved != [iter_num, best_val_loss]:
        save_checkpoint()
    if iter_num < max_iters:
        say(
            f"stopped at step {iter_num}; checkpoint saved to {ckpt_path}, "
            "resume with --init_from=resume"
        )
if pbar:
    pbar.close()
if ddp:
    # every process waits here until rank 0 has evaluated and saved: all leave the process group
    # together, none tearing down its end (and its interpreter) while a peer is still in it or its
    # own last all-reduce is still being released (scripts/ddp_stress.sh repeats the DDP tests)
    torch.distributed.barrier()
    destroy_process_group()
if stop and iter_num < max_iters:  # stopped by Ctrl-C or SIGTERM: a shell's status for it
    sys.exit(130)
