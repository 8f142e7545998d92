"""
train.py's plumbing, kept out of it so that hardening never hides the method: checks of its settings
(each returns a one-line message for the first problem found, or None), the device and precision
chosen by default (and the CPU allocator's setting), and the random-number state that makes a resumed
run exact.
"""

import ctypes
import json
import math
import os
import random
import socket
import sys

import numpy as np
import torch

from weights import GPT2_NAMES

MODES = ("ntp", "cocomix", "kd", "pause")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_MIX = ("interleave", "add", "none")  # pause is a mode of its own, not a mixing rule


def check_config(c):
    """Settings that are wrong whatever the data and models: c is train.py's config dict."""
    if c["mode"] not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {c['mode']!r}"
    if c["mode"] == "cocomix" and c["mix"] not in STUDENT_MIX:
        return f"mix must be one of {', '.join(STUDENT_MIX)} (for the pause baseline use --mode=pause), got {c['mix']!r}"
    if min(c["batch_size"], c["block_size"], c["gradient_accumulation_steps"], c["max_iters"] + 1) <= 0:
        return "batch_size, block_size and gradient_accumulation_steps must be positive, max_iters non-negative"
    if c["mode"] in ("cocomix", "kd") and not c["concept_source"]:
        return f"mode={c['mode']} needs --concept_source (a checkpoint of ours or a GPT-2 folder)"
    if c["mode"] == "cocomix" and not c["sae_path"]:
        return "mode=cocomix needs --sae_path (an SAE trained by sae.py, or OpenAI's)"
    if bad := [k for k, v in c.items() if isinstance(v, float) and not math.isfinite(v)]:
        return f"{', '.join(bad)} must be finite numbers"
    if min(c["eval_interval"], c["log_interval"], c["eval_iters"]) <= 0:
        return "eval_interval, log_interval and eval_iters must be positive"
    if c["learning_rate"] < 0 or c["min_lr"] < 0 and c["min_lr"] != -1 or c["weight_decay"] < 0:
        return "learning_rate and weight_decay must be >= 0, min_lr >= 0 (or -1: learning_rate / 10)"
    if not (0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1):
        return f"beta1 and beta2 must be in [0, 1), got {c['beta1']} and {c['beta2']}"
    if c["grad_clip"] < 0:
        return f"grad_clip must be >= 0 (0: no clipping), got {c['grad_clip']}"
    if not 0 <= c["dropout"] < 1:
        return f"dropout must be in [0, 1), got {c['dropout']}"
    if min(c["k_attr"], c["concept_topk"]) <= 0 or min(c["lam"], c["lam_kd"], c["n_concepts"]) < 0:
        return "k_attr and concept_topk must be positive, lam, lam_kd and n_concepts >= 0"
    if c["dtype"] not in DTYPES:
        return f"dtype must be one of {', '.join(DTYPES)}, got {c['dtype']!r}"
    if c["init_from"] not in ("scratch", "resume") and c["init_from"] not in GPT2_NAMES and not os.path.isdir(c["init_from"]):
        return (f"init_from must be 'scratch', 'resume', a GPT-2 name ({', '.join(GPT2_NAMES)}) or a GPT-2 folder, "
                f"got {c['init_from']!r}")
    return check_device(c["device"])


def check_device(device):
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', and there on this machine."""
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu"):
        return None
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            return f"device={device}, but CUDA is not available here (try --device=cpu)"
        if index and int(index) >= torch.cuda.device_count():
            return f"device={device}, but there are {torch.cuda.device_count()} CUDA devices"
        return None
    if device == "mps":
        return None if torch.backends.mps.is_available() else "device=mps, but MPS is not available here"
    return f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"


def check_source(source, vocab_size, block_size, concept_source):
    """The concept source (or KD teacher) against the data and the student's window."""
    if source.config.vocab_size != vocab_size:
        return f"concept source {concept_source} has vocab {source.config.vocab_size}, the data is GPT-2 BPE ({vocab_size})"
    if source.config.block_size < block_size:
        return f"block_size={block_size} is longer than the concept source's context ({source.config.block_size})"
    return None


# a resume continues the run exactly only with the same model, objective and batches: other values are refused
RESUME_SAME = ('mode', 'label_rule', 'label_fill', 'concept_source', 'sae_path', 'sae_layer', 'k_attr', 'seed', 'data_dir',
               'batch_size', 'gradient_accumulation_steps', 'decay_all')  # decay_all: other optimizer parameter groups
# the optimisation may change on purpose (a longer schedule, a lower rate): allowed, with a warning
RESUME_WARN = ('learning_rate', 'min_lr', 'warmup_iters', 'lr_decay_iters', 'decay_lr', 'weight_decay', 'beta1',
               'beta2', 'grad_clip', 'lam', 'lam_kd', 'dtype')
RESUME_KEYS = ('model', 'model_args', 'optimizer', 'scaler', 'iter_num', 'best_val_loss', 'rng')


def input_hashes(data_dir, concept_source=None, sae_path=None):
    """SHA-256 of the files a run reads behind its settings' paths: the data's meta.json (prepare.py writes
    a new one with every corpus), the concept source and the SAE. Kept in the checkpoint for check_resume."""
    from weights import file_sha256, source_sha256
    meta = os.path.join(data_dir, 'meta.json')
    hashes = {'data_dir': file_sha256(meta) if os.path.exists(meta) else None}
    if concept_source:
        hashes['concept_source'] = source_sha256(concept_source)
    if sae_path:
        hashes['sae_path'] = file_sha256(sae_path)
    return hashes


def check_resume(checkpoint, model_args, config, ckpt_path, inputs):
    """A resumed run must be the run that wrote the checkpoint: same model, objective and batches, and the
    same files behind its paths (inputs: input_hashes). Changed optimisation settings are printed as warnings."""
    if missing := [k for k in RESUME_KEYS if k not in checkpoint]:
        return f"{ckpt_path} cannot be resumed: it has no {', '.join(missing)} (not a checkpoint train.py wrote)"
    old_inputs = checkpoint.get('inputs') or {}
    if swapped := [k for k, h in inputs.items() if k in old_inputs and old_inputs[k] != h]:
        return (f"{ckpt_path} was trained with other files at the same paths: {', '.join(f'{k}={config[k]}' for k in swapped)} "
                "changed since (SHA-256); resume only with the files the run started with")
    changed = {k: (checkpoint['model_args'].get(k), v) for k, v in model_args.items() if checkpoint['model_args'].get(k) != v}
    old = checkpoint.get('config') or {}
    norm = lambda k, v: os.path.normpath(v) if k == 'data_dir' else v
    changed.update({k: (old[k], config[k]) for k in RESUME_SAME if k in old and k in config and norm(k, old[k]) != norm(k, config[k])})
    if changed:
        return f"resume config disagrees with {ckpt_path}: " + ", ".join(f"{k}={b!r} (checkpoint: {a!r})" for k, (a, b) in changed.items())
    if warn := [f"{k}={config[k]!r} (checkpoint: {old[k]!r})" for k in RESUME_WARN if k in old and k in config and old[k] != config[k]]:
        print(f"warning: resuming {ckpt_path} with other settings: {', '.join(warn)}; the run is no longer the one "
              "an uninterrupted run would give", file=sys.stderr)
    return None


def auto_device(device):
    if device != 'auto':
        return device
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def to_device(t, device):
    """A host tensor on `device`; to a GPU from pinned memory without blocking, so the host does not wait
    for the work already queued there."""
    if torch.device(device).type == 'cuda':
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def auto_dtype(dtype, device_type):
    """bf16 on GPUs that have it (else fp16 with a gradient scaler) and on CPUs with native bf16
    (AVX512-BF16/AMX; emulated bf16 is slower than fp32); fp32 elsewhere."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if device_type == 'cpu' and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 'bfloat16'
    return 'float32'


def keep_freed_memory(device="cpu"):
    """For work on a CPU device, on Linux with glibc: serve large blocks from the heap and keep freed
    memory there, instead of glibc's default of mapping every block over 32 MB afresh and unmapping it
    when freed. A CPU step frees and allocates such tensors (activations, the LM head's logit chunks)
    many times, and each fresh mapping is page-faulted and zeroed by the kernel: on a 2-core CPU that
    was a third of the step (BENCHMARKS.md). The process then holds on to its peak memory. Returns
    whether it was applied: False for a GPU (its tensors are not glibc's) or without glibc."""
    if torch.device(device).type != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h; an int, so 2 GB is the largest setting
    return bool(mallopt(M_MMAP_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def rng_state(device_type):
    """Every generator a step draws from, as plain Python values (the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy': [name, keys.tolist(), pos, has_gauss, cached],
            'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}


def set_rng_state(rng, device_type):
    torch.set_rng_state(rng['torch'])
    random.setstate(rng['python'])
    name, keys, pos, has_gauss, cached = rng['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if rng.get('cuda') is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'])


def init_processes(device, backend, gradient_accumulation_steps):
    """(ddp, rank, local_rank, world_size, device): one process, or one of torchrun's (RANK is set)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    from torch.distributed import init_process_group
    if backend == 'auto':
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
    init_process_group(backend=backend)
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the {world_size} processes")
    return True, rank, local_rank, world_size, device


def make_labeler(source, sae_path, sae_layer, k_attr, label_rule, label_fill, n_concepts, device):
    """The attribution labeler (concepts.py) from the concept source and an SAE file; (labeler, C)."""
    from concepts import ConceptLabeler
    from sae import SAE
    sae = SAE.load(sae_path, layer=sae_layer if sae_layer >= 0 else None).to(device)
    if sae.meta.get('layer') is None:
        raise ValueError(f"{sae_path} does not say which layer it was trained on: pass --sae_layer")
    if n_concepts and n_concepts != sae.n_latents:
        raise ValueError(f"n_concepts={n_concepts} but the SAE has {sae.n_latents} latents")
    return ConceptLabeler(source, sae, sae.meta['layer'], k_attr, label_rule, label_fill), sae.n_latents


def check_sae_host(sae, source_path):
    """Refuse an SAE trained on another concept source: sae.py records the SHA-256 of its host's file, and
    another model of the same width and layer has another residual stream (its labels would be noise)."""
    want = sae.meta.get('host_sha256')
    if not want or not source_path:  # OpenAI's SAEs record none (nor did ours on GPT-2 folders before 2026-12-02)
        return
    from weights import source_sha256
    if (have := source_sha256(source_path)) != want:
        raise ValueError(f"SAE {sae.path} was trained on {sae.meta.get('host')} (sha256 {want[:12]}), not on the concept "
                         f"source {source_path} (sha256 {have[:12]}): pass the concept source it was trained on")


def hold_lock(path):
    """Take the lock file `path` for this process, or raise RuntimeError naming the process holding it: one
    run per folder, since two would overwrite each other's checkpoints and interleave their logs. The lock
    is an flock, which the kernel drops when its process ends, however it ends (kill -9 too), so a killed
    run never leaves it stale; the file holds the holder's PID and host for the message and is removed at
    exit, or by calling the function returned (a second call does nothing)."""
    import atexit
    import fcntl
    folder = os.path.dirname(os.path.abspath(path))
    created = not os.path.isdir(folder)  # removed again at exit if the run wrote nothing else there
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, or not a folder
            raise RuntimeError(f"cannot write in {folder} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b'{}')
            except ValueError:  # the holder is still writing it
                holder = {}
            os.close(fd)
            raise RuntimeError(f"{folder} is in use by another run (PID {holder.get('pid', '?')} "
                               f"on {holder.get('host', '?')}): wait for it, stop it, or use another folder") from None
        except OSError as e:
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run on this folder", file=sys.stderr)
            return lambda: None
        try:  # a holder that just exited may have removed the file we opened: then lock the one there now
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode(), 0)

    def release():
        if fd in held:
            held.remove(fd)
            try:
                os.remove(path)  # while still holding it, so no other run can have locked this file
                if created:
                    os.rmdir(folder)
            except OSError:  # not empty
                pass
            os.close(fd)
    held = [fd]
    atexit.register(release)
    return release


def trim_log(path, iter_num):
    """For a run starting at step iter_num (a checkpoint's; 0 from scratch): drop the records log.jsonl holds
    of later steps (a run killed after its last checkpoint logged them, and this run logs them again), of
    the eval at iter_num (which it repeats), and a line torn by a kill, so that the log reads as one run's."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get('iter', -1) < iter_num and r.get('train_step', -1) <= iter_num:
            keep.append(line if line.endswith('\n') else line + '\n')
    if keep != lines:
        with open(path + '.tmp', 'w') as f:
            f.writelines(keep)
        os.replace(path + '.tmp', path)


def label_cache_note(label_caches, record):
    """Windows so far (this process) whose labels came from disk / were computed: into the log record,
    and as text for the eval line."""
    if not label_caches:
        return ""
    record['label_hits'] = sum(c.hits for c in label_caches.values())
    record['label_computed'] = sum(c.misses for c in label_caches.values())
    return f", labels cached {record['label_hits']}/{record['label_hits'] + record['label_computed']}"
