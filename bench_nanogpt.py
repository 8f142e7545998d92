"""
bench.py --vs_nanogpt PATH: this project's training step against nanoGPT's, on the same model, weights
and batch, with steps alternating; nanoGPT's model.py is imported from a local checkout.
"""

import copy
import os

import torch

from bench import (alternate, autocast, batch, optimizer, persistent_bytes, student, student_loss, train_step,
                   transient_peak)
from flops import flops_per_token


def load_nanogpt(path):
    """nanoGPT's model.py from a local checkout (its folder or the file), imported as its own module."""
    import importlib.util
    f = os.path.join(path, "model.py") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise SystemExit(f"error: --vs_nanogpt: no nanoGPT model.py at {path}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", f)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_vs_nanogpt(args):
    """Our NTP step (train.py's: lm_loss, clip, AdamW) against nanoGPT's (its GPT with full logits and
    F.cross_entropy, the same clip and AdamW settings; ours fused on a CPU too), same config, same initial
    weights, same batch, steps
    alternating; then the CoCoMix student (cached labels) against the parameter-matched NTP step."""
    import contextlib
    import io
    from model import ntp_matched_width
    nano, dev, T = load_nanogpt(args.vs_nanogpt), args.device, args.block_size
    X, Y = batch(args, dev)
    tokens = X.numel()
    cfg = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=T, vocab_size=50257,
               dropout=0.0, bias=True)
    ours = student(args, "ntp", dev)
    with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter counts
        theirs = nano.GPT(nano.GPTConfig(**cfg)).to(dev)
        theirs.load_state_dict(ours.state_dict())  # the same weights: the first losses must agree
        opt_theirs = theirs.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(dev).type)
    first = copy.deepcopy(ours), copy.deepcopy(theirs)  # both train below: the loss check takes these
    opt_ours = optimizer(ours)
    coco = student(args, "cocomix", dev)
    matched = copy.copy(args)
    matched.n_embd = ntp_matched_width(coco.config)
    ntp = student(matched, "ntp", dev)
    opt_coco, opt_ntp = optimizer(coco), optimizer(ntp)
    labels = torch.randint(0, args.n_concepts, (args.batch_size, T, args.k_attr), generator=torch.Generator().manual_seed(0)).to(dev)
    print(f"device={dev}: {args.n_layer} layers, d={args.n_embd}, {args.n_head} heads, block {T}, batch {args.batch_size} "
          f"({tokens} tokens), vocab 50257 for both; medians of {args.rounds} alternating rounds of {args.steps} step(s)")
    for dtype in args.dtypes.split(","):
        ctx = autocast(dev, dtype)

        def nanogpt_step():
            with ctx:
                _, loss = theirs(X, Y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)
            return loss
        steps = {"nanoGPT": nanogpt_step, "ours": train_step(ours, opt_ours, X, Y, ctx),
                 f"ntp d={matched.n_embd}": train_step(ntp, opt_ntp, X, Y, ctx),
                 "cocomix": train_step(coco, opt_coco, X, Y, ctx, labels, args.lam)}
        with torch.no_grad(), ctx:  # the initial weights, same batch: the same loss up to the precision
            same = abs(student_loss(first[0], X, Y).item() - first[1](X, Y)[1].item())
        peak = {k: transient_peak(fn, dev)[0] for k, fn in steps.items()}
        kept = {"nanoGPT": persistent_bytes(theirs, opt_theirs), "ours": persistent_bytes(ours, opt_ours),
                f"ntp d={matched.n_embd}": persistent_bytes(ntp, opt_ntp), "cocomix": persistent_bytes(coco, opt_coco, labels)}
        t = alternate(steps, args, dev)
        print(f"\n{dtype} (first loss ours - nanoGPT's: {same:.1e})\n{'step':<14} {'ms':>9} {'tok/s':>8} {'peak MiB':>9}")
        for k in steps:
            print(f"{k:<14} {t[k] * 1e3:>9.1f} {tokens / t[k]:>8.0f} {(peak[k] + kept[k]) / 2**20:>9.0f}")
        rf = flops_per_token(coco, T) / flops_per_token(ntp, T)
        print(f"ours vs nanoGPT: {t['nanoGPT'] / t['ours']:.2f}x the speed, peak memory {(peak['ours'] + kept['ours']) / (peak['nanoGPT'] + kept['nanoGPT']):.2f}x")
        r = t["cocomix"] / t[f"ntp d={matched.n_embd}"]
        print(f"cocomix (d={args.n_embd}, cached labels) / parameter-matched ntp: time {r:.2f}x, FLOPs {rf:.2f}x, "
              f"time / FLOP ratio {r / rf:.2f}")
