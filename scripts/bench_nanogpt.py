"""
This project's NTP training step against nanoGPT's, on the same model, weights and batch; then the
CoCoMix student against the parameter-matched NTP step; then each repository as it runs by default,
a process each.

    python -m scripts.bench_nanogpt --vs_nanogpt=PATH --n_embd=192 --batch_size=16 \\
        --dtypes=float32,bfloat16

PATH is a local nanoGPT checkout (its folder or its model.py). `python -m scripts.bench
--vs_nanogpt=PATH` runs the same. The options are bench.py's (scripts/bench_common.py).
"""

import argparse
import copy
import json
import os
import statistics
import time

import torch

from cocomix.flops import flops_per_token
from scripts.bench_common import (
    alternate,
    autocast,
    batch,
    minor_faults,
    optimizer,
    options,
    persistent_bytes,
    settle,
    student,
    student_loss,
    sync,
    train_step,
    transient_peak,
)


def parse(argv=None):
    p = options(__doc__)
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    p.add_argument(
        "--vs_nanogpt",
        required=True,
        help="nanoGPT checkout (folder or its model.py): NTP step side by side",
    )
    p.add_argument("--side", choices=("ours", "nanogpt"), help=argparse.SUPPRESS)  # one repo's step
    return settle(p.parse_args(argv))


def load_nanogpt(path):
    """nanoGPT's model.py from a local checkout (its folder or the file), imported as its own
    module."""
    import importlib.util

    f = os.path.join(path, "model.py") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise SystemExit(f"error: --vs_nanogpt: no nanoGPT model.py at {path}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", f)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_vs_nanogpt(args):
    """Our NTP step (train.py's: lm_loss, clip, AdamW) against nanoGPT's (its GPT with full logits
    and F.cross_entropy, the same clip and AdamW settings; ours fused on a CPU too), same config,
    same initial weights, same batch, steps alternating; then the CoCoMix student (cached labels)
    against the parameter-matched NTP step."""

    from model import ntp_matched_width

    nano, dev, T = load_nanogpt(args.vs_nanogpt), args.device, args.block_size
    args.warmup = max(args.warmup, 3)  # the heap and oneDNN's kernels settle in the first steps
    X, Y = batch(args, dev)
    tokens = X.numel()
    cfg = dict(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=T,
        vocab_size=50257,
        dropout=0.0,
        bias=True,
    )
    ours = student(args, "ntp", dev)
    theirs, opt_theirs = nanogpt_model(nano, cfg, dev)
    theirs.load_state_dict(ours.state_dict())  # the same weights: the first losses must agree
    # and as nanoGPT configures itself: its vocabulary padded to 50,304 (a multiple of 64)
    padded, opt_padded = nanogpt_model(nano, dict(cfg, vocab_size=50304), dev)
    # both train below: the loss check takes these
    first = (
        copy.deepcopy(ours),
        copy.deepcopy(theirs),
    )
    opt_ours = optimizer(ours)
    coco = student(args, "cocomix", dev)
    matched = copy.copy(args)
    matched.n_embd = ntp_matched_width(coco.config)
    ntp = student(matched, "ntp", dev)
    opt_coco, opt_ntp = optimizer(coco), optimizer(ntp)
    labels = torch.randint(
        0,
        args.n_concepts,
        (args.batch_size, T, args.k_attr),
        generator=torch.Generator().manual_seed(0),
    ).to(dev)
    print(
        f"device={dev}: {args.n_layer} layers, d={args.n_embd}, {args.n_head} heads, block {T}, "
        f"batch {args.batch_size} ({tokens} tokens), vocab 50257 (nanoGPT also at its 50304); "
        f"medians of {args.rounds} alternating rounds of {args.steps} step(s) after {args.warmup}"
    )
    for dtype in args.dtypes.split(","):
        ctx = autocast(dev, dtype)

        steps = {
            "nanoGPT": nanogpt_step(theirs, opt_theirs, X, Y, ctx),
            "nanoGPT 50304": nanogpt_step(padded, opt_padded, X, Y, ctx),
            "ours": train_step(ours, opt_ours, X, Y, ctx),
            f"ntp d={matched.n_embd}": train_step(ntp, opt_ntp, X, Y, ctx),
            "cocomix": train_step(coco, opt_coco, X, Y, ctx, labels, args.lam),
        }
        # the initial weights, same batch: the same loss up to the precision
        with (
            torch.no_grad(),
            ctx,
        ):
            same = abs(student_loss(first[0], X, Y).item() - first[1](X, Y)[1].item())
        peak = {k: transient_peak(fn, dev)[0] for k, fn in steps.items()}
        kept = {
            "nanoGPT": persistent_bytes(theirs, opt_theirs),
            "nanoGPT 50304": persistent_bytes(padded, opt_padded),
            "ours": persistent_bytes(ours, opt_ours),
            f"ntp d={matched.n_embd}": persistent_bytes(ntp, opt_ntp),
            "cocomix": persistent_bytes(coco, opt_coco, labels),
        }
        faults = {}
        t = alternate(steps, args, dev, faults)
        print(
            f"\n{dtype} (first loss ours - nanoGPT's: {same:.1e}), in one process\n"
            f"{'step':<14} {'ms':>9} {'tok/s':>8} {'peak MiB':>9} {'faults/step':>12}"
        )
        for k in steps:
            print(
                f"{k:<14} {t[k] * 1e3:>9.1f} {tokens / t[k]:>8.0f} "
                f"{(peak[k] + kept[k]) / 2**20:>9.0f} {faults[k]:>12.0f}"
            )
        rf = flops_per_token(coco, T) / flops_per_token(ntp, T)
        mem = lambda k: peak[k] + kept[k]
        print(
            f"ours vs nanoGPT: {t['nanoGPT'] / t['ours']:.2f}x the speed, peak memory "
            f"{mem('ours') / mem('nanoGPT'):.2f}x; against its padded vocabulary: "
            f"{t['nanoGPT 50304'] / t['ours']:.2f}x, {mem('ours') / mem('nanoGPT 50304'):.2f}x"
        )
        r = t["cocomix"] / t[f"ntp d={matched.n_embd}"]
        print(
            f"cocomix (d={args.n_embd}, cached labels) / parameter-matched ntp: time {r:.2f}x, "
            f"FLOPs {rf:.2f}x, time / FLOP ratio {r / rf:.2f}"
        )
        shipped, shipped_faults = bench_as_shipped(args, dtype)
        print(
            "as each repository runs by default (a process each, taking turns; nanoGPT: "
            "vocabulary 50304, its optimizer, glibc's allocator): ours vs nanoGPT "
            f"{shipped['nanogpt'] / shipped['ours']:.2f}x the speed ({shipped['ours'] * 1e3:.0f} "
            f"vs {shipped['nanogpt'] * 1e3:.0f} ms; page faults per step "
            f"{shipped_faults['ours']:.0f} vs {shipped_faults['nanogpt']:.0f})"
        )


def nanogpt_model(nano, cfg, device):
    """nanoGPT's GPT of config cfg and its own optimizer (weight decay 0.1, lr 1e-4, its AdamW
    choice for the device), its parameter-count prints silenced."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model = nano.GPT(nano.GPTConfig(**cfg)).to(device)
        return model, model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(device).type)


def nanogpt_step(theirs, opt, X, Y, ctx):
    """nanoGPT's step as its train.py takes it: full logits and F.cross_entropy (its forward's
    loss), then train_step's backward, clip and optimizer step."""
    return train_step(theirs, opt, X, Y, ctx, loss_fn=lambda model, x, y, *_, **__: model(x, y)[1])


def side_times(args):
    """--side: one repository's NTP step as it runs by default, alone in this process; prints its
    seconds and page faults per step as JSON. nanoGPT: its padded vocabulary (50,304), its own
    optimizer choice and glibc's default allocator (the parent passes --no_cpu_heap); ours:
    train.py's step (the chunked LM head, fused AdamW, the heap setting of cpu_heap=True)."""
    dev, ctx = args.device, autocast(args.device, args.dtypes)
    X, Y = batch(args, dev)
    if args.side == "nanogpt":
        sizes = ("n_layer", "n_head", "n_embd", "block_size")
        cfg = dict({k: getattr(args, k) for k in sizes}, dropout=0.0, bias=True)  # its vocabulary
        step = nanogpt_step(*nanogpt_model(load_nanogpt(args.vs_nanogpt), cfg, dev), X, Y, ctx)
    else:
        ours = student(args, "ntp", dev)
        step = train_step(ours, optimizer(ours), X, Y, ctx)
    for _ in range(args.warmup):
        step()
    times, faults = [], []
    for _ in range(args.steps):
        sync(dev)
        f0, t0 = minor_faults(), time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    print(json.dumps({"times": times, "faults": faults}))


def bench_as_shipped(args, dtype):
    """Ours vs nanoGPT as a user comparing the two repositories runs them: each step in its own
    process with that repository's defaults (side_times), the processes taking turns, nanoGPT first
    in even rounds. Returns the median seconds and page faults per step of each."""
    import subprocess
    import sys

    sizes = [f"--{k}={getattr(args, k)}" for k in ("n_layer", "n_head", "n_embd", "block_size")]
    common = [
        sys.executable,
        "-m",
        "scripts.bench_nanogpt",
        f"--vs_nanogpt={args.vs_nanogpt}",
        *sizes,
        f"--batch_size={args.batch_size}",
        f"--dtypes={dtype}",
        f"--device={args.device}",
        f"--warmup={max(args.warmup, 2)}",
        f"--steps={max(args.steps, 3)}",
    ]
    extra = {"ours": [], "nanogpt": ["--no_cpu_heap"]}
    times, faults = {"ours": [], "nanogpt": []}, {"ours": [], "nanogpt": []}
    for r in range(args.rounds):
        for side in ("nanogpt", "ours") if r % 2 == 0 else ("ours", "nanogpt"):
            out = subprocess.run(
                common + [f"--side={side}"] + extra[side],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.dirname(__file__)),
            )
            if out.returncode:
                raise SystemExit(f"error: --vs_nanogpt, {side}'s process: {out.stderr[-1000:]}")
            record = json.loads(out.stdout.splitlines()[-1])
            times[side].append(statistics.median(record["times"]))
            faults[side].append(statistics.median(record["faults"]))
    median = lambda d: {k: statistics.median(v) for k, v in d.items()}
    return median(times), median(faults)


def run(args):
    """--side: one repository's step in this process; otherwise the whole comparison."""
    if args.side:
        return side_times(args)
    # both steps eager: nanoGPT's compile is its own train.py's, not its model's
    if args.compile:
        raise SystemExit("error: --vs_nanogpt times eager steps; --compile does not apply to it")
    return bench_vs_nanogpt(args)


def main(argv=None):
    run(parse(argv))


if __name__ == "__main__":
    main()
