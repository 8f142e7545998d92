"""
train.py's plumbing, kept out of it so that hardening never hides the method: the device and
precision chosen by default (and the CPU allocator's setting), processes for DDP, the lock that
keeps one run per folder, the log's trimming on resume, and the random-number state that makes a
resumed run exact.
"""

import ctypes
import json
import os
import random
import socket
import sys

import numpy as np
import torch

from cocomix.weights import write_atomic


def auto_device(device):
    if device != "auto":
        return device
    return (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )


def to_device(t, device):
    """A host tensor on `device`; to a GPU from pinned memory without blocking, so the host does not
    wait for the work already queued there."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def auto_dtype(dtype, device_type):
    """bf16 on GPUs that have it (else fp16 with a gradient scaler) and on CPUs with native bf16
    (AVX512-BF16/AMX; emulated bf16 is slower than fp32); fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


def keep_freed_memory(device="cpu"):
    """For work on a CPU device, on Linux with glibc: serve large blocks from the heap and keep
    freed memory there, instead of glibc's default of mapping every block over 32 MB afresh and
    unmapping it when freed. A CPU step frees and allocates such tensors (activations, the LM head's
    logit chunks) many times, and each fresh mapping is page-faulted and zeroed by the kernel: on a
    2-core CPU that was a third of the step (docs/benchmarks.md). The process then holds on to its
    peak memory. Returns whether it was applied: False for a GPU (its tensors are not glibc's) or
    without glibc."""
    if torch.device(device).type != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h; an int, so 2 GB is the largest mmap one
    # a trim threshold of -1 never trims: any finite one (at most 2 GB) gives back a step's freed
    # top of the heap once it is larger, and the next step faults it in again (a step with GBs of
    # logits did so every step: docs/benchmarks.md)
    return bool(mallopt(M_MMAP_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def rng_state(device_type):
    """Every generator a step draws from, as plain Python values (the checkpoint loads with
    weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
    }


def set_rng_state(rng, device_type):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if rng.get("cuda") is not None and device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping the settings this run built the optimizer with
    (betas, weight decay, eps): load_state_dict restores the saved param groups' values, which would
    silently undo a resume's changed --beta1, --beta2 or --weight_decay. The learning rate is set
    every step anyway."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def init_processes(device, backend, gradient_accumulation_steps):
    """(ddp, rank, local_rank, world_size, device): one process, or one of torchrun's (RANK set)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    from torch.distributed import init_process_group

    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    init_process_group(backend=backend)
    rank, local_rank, world_size = (
        int(os.environ["RANK"]),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["WORLD_SIZE"]),
    )
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise ValueError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
            f"{world_size} processes"
        )
    return True, rank, local_rank, world_size, device


def hold_lock(path):
    """Take the lock file `path` for this process, or raise RuntimeError naming the process holding
    it: one run per folder, since two would overwrite each other's checkpoints and interleave their
    logs. The lock is an flock, which the kernel drops when its process ends, however it ends (kill
    -9 too), so a killed run never leaves it stale; the file holds the holder's PID and host for the
    message and is removed at exit, or by calling the function returned (a second call does
    nothing)."""
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
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # the holder is still writing it
                holder = {}
            os.close(fd)
            raise RuntimeError(
                f"{folder} is in use by another run (PID {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}): wait for it, stop it, or use another folder"
            ) from None
        except OSError as e:
            os.close(fd)
            print(
                f"warning: cannot lock {path} ({e.strerror}); "
                "nothing stops a second run on this folder",
                file=sys.stderr,
            )
            return lambda: None
        # a holder that just exited may have removed the file we opened: then lock the one there now
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    except OSError as e:  # a full disk: no empty lock file is left behind
        os.remove(path)  # still holding it, as release does
        os.close(fd)
        if created:
            try:
                os.rmdir(folder)
            except OSError:
                pass
        raise RuntimeError(f"cannot write in {folder} ({e.strerror})") from None

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
    """For a run starting at step iter_num (a checkpoint's; 0 from scratch): drop the records
    log.jsonl holds of later steps (a run killed after its last checkpoint logged them, and this run
    logs them again), of the eval at iter_num (which it repeats), and a line torn by a kill, so that
    the log reads as one run's."""
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
        if r.get("iter", -1) < iter_num and r.get("train_step", -1) <= iter_num:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        write_atomic(path, "".join(keep))


def label_cache_note(label_caches, record):
    """Windows so far (this process) whose labels came from disk / were computed: into the log
    record, and as text for the eval line."""
    if not label_caches:
        return ""
    record["label_hits"] = sum(c.hits for c in label_caches.values())
    record["label_computed"] = sum(c.misses for c in label_caches.values())
    return (
        f", labels cached {record['label_hits']}/{record['label_hits'] + record['label_computed']}"
    )
