"""Helpers the test files share (the pytest fixtures built from them are in conftest.py): running
the root scripts, the tiny model's flags, and small token files, concept sources and SAEs on disk.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from cocomix.weights import save_atomic
from model import GPT, GPTConfig
from sae import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# TIKTOKEN_CACHE_DIR, where set (offline), reaches the scripts run as subprocesses
ENV = dict(os.environ)
T = 16  # block_size of the small token files' tests
# train.py's flags for a model that trains in seconds
TINY = [
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=4",
    "--device=cpu",
    "--dtype=float32",
    "--progress=False",
    "--eval_iters=2",
    "--log_interval=1",
]


def run(*args, cwd=ROOT, check=True):
    """python *args in the repository (a script, or -m scripts.NAME); an AssertionError with the
    output tails when check and it fails."""
    p = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_log_lines(out_dir, n, seconds):
    """Waits, at most `seconds`, until a running train.py's log.jsonl holds n records (a bounded
    wait, not a timing condition: what follows holds at whichever step it comes)."""
    log, deadline = os.path.join(out_dir, "log.jsonl"), time.time() + seconds
    while time.time() < deadline and not (os.path.exists(log) and sum(1 for _ in open(log)) >= n):
        time.sleep(0.2)


def write_data(data_dir, seed=0, n_train=1200, n_val=400):
    """uint16 train.bin / val.bin and a meta.json as prepare.py writes them (the fields train.py
    reads)."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    # a small vocabulary, so the tiny source sees repeats
    vocab = rng.choice(50257, 300, replace=False)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.choice(vocab, n).astype(np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
    write_meta(data_dir, seed)
    return str(data_dir)


def write_meta(data_dir, seed=0):
    """The meta.json prepare.py writes next to the token files already in data_dir (the fields
    load_tokens checks)."""
    splits = {}
    for split in ("train", "val"):
        splits[split] = {"tokens": os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // 2}
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_token": 50256,
        "dtype": "uint16",
        "seed": seed,
        "splits": splits,
    }
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


def write_source(path, seed=0):
    """A tiny random GPT saved as train.py saves checkpoints; returns it frozen, as train.py loads
    it."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=3, n_head=2, n_embd=32)
    model = GPT(cfg)
    save_atomic({"model": model.state_dict(), "model_args": dataclasses.asdict(cfg)}, path)
    return model.eval().requires_grad_(False)


def write_sae(path, seed=0):
    torch.manual_seed(seed)
    sae = SAE(32, 96, 8, meta={"layer": 1})
    sae.save(str(path))
    return sae


def window_batch(data_dir, windows, split="train"):
    """x, y of the given grid windows, as train.py's get_batch cuts them."""
    d = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    x = np.stack([d[w * T : w * T + T] for w in windows]).astype(np.int64)
    y = np.stack([d[w * T + 1 : w * T + T + 1] for w in windows]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def cached(cache, data_dir, windows):
    x, y = window_batch(data_dir, windows)
    return cache.labels(windows, x, y), x, y


def signal_in_final_eval(steps, sig):
    """Hook code for a child train.py: send itself `sig` (e.g. "SIGTERM") during the evaluation
    after `steps` optimizer steps, which ends with math.exp (the perplexity)."""
    return f"""
import math, os, signal, torch
_clip, _exp, _steps = torch.nn.utils.clip_grad_norm_, math.exp, [0]
def _count(*a, **k):
    _steps[0] += 1
    return _clip(*a, **k)
def _exp_hook(x):
    if _steps[0] == {steps}:
        os.kill(os.getpid(), signal.{sig})
    return _exp(x)
torch.nn.utils.clip_grad_norm_, math.exp = _count, _exp_hook"""
