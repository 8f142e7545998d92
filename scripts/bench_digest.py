"""
The cost of the content digest that checkpoints and SAE files carry (cocomix/weights.py): load time
of a GPT checkpoint with its AdamW state, as train.py saves it, with and without the check, and a
full SHA-256 of the file for comparison (docs/benchmarks.md, "Digest checks").

    python -m scripts.bench_digest                       # GPT-2 124M (GPTConfig's defaults)
    python -m scripts.bench_digest --n_layer=2 --n_embd=64 --repeats=1
"""

import argparse
import hashlib
import os
import tempfile
import time

import torch

from cocomix.weights import content_digest, load_torch_file, save_atomic
from model import GPT, GPTConfig


def main(argv=None):
    p = argparse.ArgumentParser(description="Load time with and without the digest check.")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    for w in model.parameters():
        w.grad = torch.randn_like(w) * 1e-3
    opt.step()  # AdamW's two moments per parameter, as in a checkpoint of a run
    times = {"load unchecked": [], "load checked": [], "digest alone": [], "file SHA-256": []}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        del opt
        for _ in range(a.repeats):
            t = time.perf_counter()
            obj = load_torch_file(path, "checkpoint", verify=False)
            times["load unchecked"].append(time.perf_counter() - t)
            t = time.perf_counter()
            content_digest(obj)
            times["digest alone"].append(time.perf_counter() - t)
            del obj
            t = time.perf_counter()
            load_torch_file(path, "checkpoint")
            times["load checked"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with open(path, "rb") as f:
                hashlib.file_digest(f, "sha256")
            times["file SHA-256"].append(time.perf_counter() - t)
        size = os.path.getsize(path)
    print(f"{model.get_num_params() / 1e6:.1f}M parameters, file {size / 1e9:.2f} GB")
    for k, v in times.items():
        print(f"{k}: best {min(v):.2f} s (all: {', '.join(f'{x:.2f}' for x in v)})")
    return times


if __name__ == "__main__":
    main()
