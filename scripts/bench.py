"""
Benchmarks of the student and of its concept labels. Every timing runs its variants in turn
(A, B, A, B, ...) and reports medians, because the machines are shared and noisy: read the ratios,
which are measured within one process, rather than the absolute times.

    # tokens/s and MFU per precision, NTP and CoCoMix
    python -m scripts.bench --dtypes=float32,bfloat16 --compare
    # one step in stages: time, FLOPs, peak memory
    python -m scripts.bench --split --mode=cocomix
    # CoCoMix/NTP time vs FLOPs, label cost, memory
    python -m scripts.bench --bars --dtypes=bfloat16
    # sparse top-k mixing vs the dense masked product
    python -m scripts.bench --mixing --n_embd=512
    # KD's step: full logits vs the chunked CE + KL
    python -m scripts.bench --kd --dtypes=bfloat16
    # NTP step against nanoGPT's model.py; CoCoMix vs NTP (runs bench_nanogpt.py)
    python -m scripts.bench --vs_nanogpt=PATH --n_embd=192 --batch_size=16 --dtypes=float32,bfloat16

torch.compile's graph-break check and the compiled GPU MFU measurement are in bench_compile.py;
the options and helpers the benches share are in bench_common.py.

Defaults: a student of 4 layers, d=256, block 256, batch 8, C=8192 concepts, K=32, insert layer 1; a
concept source of 6 layers, d=256, with an SAE of 8192 latents (k=32) on block 2. Source and SAE get
random weights unless --source_ckpt / --sae_path name trained ones: the work of a step does not
depend on the weights. CoCoMix steps are train.py's: labels, the student's loss with the chunked LM
head, backward, gradient clipping, AdamW. `--tiny` shrinks every model to a smoke-test size.
"""

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import scripts.bench_nanogpt as bench_nanogpt
from cocomix.flops import estimate_mfu, flops_per_token, label_flops, stage_flops
from cocomix.ops import lm_loss, sparse_mix
from model import interleave, standardise, teacher_of
from scripts.bench_common import (
    alternate,
    autocast,
    batch,
    bench_labeler,
    optimizer,
    options,
    persistent_bytes,
    settle,
    source_train_step,
    student,
    student_loss,
    sync,
    train_step,
    transient_peak,
)


def parse(argv=None):
    p = options(__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="tokens for --mixing")
    p.add_argument(
        "--mode",
        default="ntp",
        choices=("ntp", "cocomix"),
        help="objective for the throughput and --split modes",
    )
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    p.add_argument(
        "--vs_nanogpt",
        default="",
        help="nanoGPT checkout (folder or its model.py): NTP step side by side",
    )
    p.add_argument("--side", choices=("ours", "nanogpt"), help=argparse.SUPPRESS)  # one repo's step
    for flag, text in dict(
        compare="NTP and CoCoMix at the same student config",
        split="per-stage time, FLOPs and memory",
        bars="CoCoMix/NTP time per FLOP, label cost and memory",
        mixing="sparse vs dense mixing, fwd+bwd",
        kd="KD's step with full teacher and student logits vs the chunked CE + KL",
    ).items():
        p.add_argument(f"--{flag}", action="store_true", help=text)
    return settle(p.parse_args(argv))


# -----------------------------------------------------------------------------
# one step in stages


class Stages:
    """A training step cut into stages at detached tensors. Each stage's forward runs (and is timed)
    on its own; backward() then walks the stages in reverse, each from the gradients its outputs
    collected, so every stage's forward + backward time is its own and nothing is computed twice."""

    def __init__(self, device):
        self.device, self.chain, self.time = device, [], {}

    def clock(self, name, fn):
        # where transient_peak finds the stage
        with torch.profiler.record_function("stage:" + name):
            t0 = time.perf_counter()
            out = fn()
            sync(self.device)
        self.time[name] = self.time.get(name, 0.0) + time.perf_counter() - t0
        return out

    def __call__(self, name, fn, *inputs):
        outs = self.clock(name, lambda: fn(*inputs))
        outs = outs if isinstance(outs, tuple) else (outs,)
        cut = tuple(o.detach().requires_grad_() if o.requires_grad else o for o in outs)
        self.chain.append((name, outs, cut))
        return cut if len(cut) > 1 else cut[0]

    def backward(self):
        for name, outs, cut in reversed(self.chain):
            # a 0-dim output is a loss term (already weighted): its gradient is 1
            pairs = [
                (o, torch.ones_like(o) if o.dim() == 0 else c.grad)
                for o, c in zip(outs, cut)
                if o.requires_grad
            ]
            pairs = [(o, g) for o, g in pairs if g is not None]
            if pairs:
                tensors, grads = zip(*pairs)
                self.clock(name, lambda: torch.autograd.backward(tensors, grads))


@contextmanager
def label_parts(st, labeler):
    """Time the labeler's parts by wrapping, for the duration, the two methods it calls: its
    source's forward_to and its own scores (if a refactor renames them, only the total is timed)."""
    wrapped = []
    for obj, attr, name in (
        (labeler.source, "forward_to", "labels: source to SAE layer"),
        (labeler, "scores", "labels: SAE + attribution"),
    ):
        if hasattr(obj, attr):
            setattr(
                obj,
                attr,
                lambda *a, _f=getattr(obj, attr), _n=name, **k: st.clock(_n, lambda: _f(*a, **k)),
            )
            wrapped.append((obj, attr))
    try:
        yield
    finally:
        for obj, attr in wrapped:
            delattr(obj, attr)  # the instance attribute goes, the class's method is back


def staged_step(model, opt, X, Y, ctx, labels=None, lam=0.1):
    """train_step's step run as Stages, made of the model's own pieces in GPT.hidden_states' order
    (embed, the blocks below insert_layer, standardise and ConceptMixer.predict,
    ConceptMixer.compress and interleave, the blocks above, ln_f), with student_loss's terms.
    labels: a labeler (labels on the fly) or a tensor (cached). opt=None leaves out the optimizer
    and keeps the grads. Returns (stages, loss)."""
    cfg, tr, L = model.config, model.transformer, model.config.insert_layer
    st = Stages(X.device)

    def blocks(bs, h):
        for b in bs:
            h = b(h)
        return h

    def concept(h):
        x, mu, std = standardise(h)
        _, values, indices, concept_loss = model.mixer.predict(x, labels=labels, fused=True)
        return values, indices, mu, std, lam * concept_loss

    # the rest of GPT.mix_concepts, from the concept stage's TopK
    def mixing(h, values, indices, mu, std):
        if cfg.mix == "none":
            return h
        c = model.mixer.compress(values, indices, mu, std)
        return interleave(h, c) if cfg.mix == "interleave" else h + c.to(h.dtype)

    with ctx:
        if callable(labels):
            with label_parts(st, labels):
                labels = st("labels", labels, X, Y)
        h = st("below", lambda x: blocks(tr.h[:L], model.embed(x)), X)
        if cfg.n_concepts:
            values, indices, mu, std, lc = st("concept", concept, h)
            h = st("mixing", mixing, h, values, indices, mu, std)
        h = st("above", lambda h: blocks(tr.h[L:], h), h)
        ntp = st(
            "lm_head",
            lambda h: lm_loss(
                tr.ln_f(h[:, 1::2] if cfg.interleaved else h), model.lm_head.weight, Y
            ),
            h,
        )
    st.backward()
    if opt is not None:
        st.clock(
            "optimizer",
            lambda: (
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                opt.step(),
                opt.zero_grad(set_to_none=True),
            ),
        )
    return st, ntp + lc if cfg.n_concepts else ntp


STAGE_NAMES = {
    "labels": "concept labels, on the fly (total)",
    "labels: source to SAE layer": "  source forward to the SAE layer",
    "labels: SAE + attribution": "  SAE encode + attribution",
    "labels: rest": "  source above it, fwd + act. bwd; top-k",
    "below": "embedding + blocks below insert layer",
    "concept": "concept head, TopK + concept loss",
    "mixing": "mixing: sparse mix, interleave",
    "above": "blocks from insert layer on",
    "lm_head": "final LN + chunked LM head + loss",
    "optimizer": "grad clip + AdamW",
}


def bench_split(args):
    dev, T, tokens = args.device, args.block_size, args.batch_size * args.block_size
    X, Y = batch(args, dev)
    labeler = bench_labeler(args, dev) if args.mode == "cocomix" else None
    model = student(args, args.mode, dev)
    opt = optimizer(model)
    flops = stage_flops(model, T)
    if labeler is not None:
        flops.update(label_flops(labeler, T), labels=sum(label_flops(labeler, T).values()))
    for dtype in args.dtypes.split(","):
        ctx = autocast(dev, dtype)
        runs = []

        def staged():
            runs.append(staged_step(model, opt, X, Y, ctx, labeler, args.lam)[0].time)

        whole = train_step(model, opt, X, Y, ctx, labeler, args.lam)
        whole = alternate({"staged": staged, "whole": whole}, args, dev)["whole"]
        runs = runs[args.warmup :]
        n, t = len(runs), {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if labeler is not None:
            parts = ("labels: source to SAE layer", "labels: SAE + attribution")
            t["labels: rest"] = t["labels"] - sum(t.get(k, 0) for k in parts)
        peaks = transient_peak(staged, dev)[1]
        t_student = sum(v for k, v in t.items() if not k.startswith("labels"))
        rows = {
            **{STAGE_NAMES[k]: (t[k], flops[k], peaks.get(k)) for k in STAGE_NAMES if k in t},
            "sum of student stages": (t_student, flops_per_token(model, T), None),
        }
        if labeler is not None:
            rows["sum of all stages"] = (
                t_student + t["labels"],
                flops_per_token(model, T) + flops["labels"],
                None,
            )
        total = t_student + t.get("labels", 0)
        print(
            f"\n{args.mode} step in stages, {dtype}, device={dev}, "
            f"{tokens} tokens/step, medians of {n} steps"
        )
        print(f"{'stage':<42} {'ms':>9} {'% step':>7} {'GFLOP':>8} {'TFLOP/s':>8} {'peak MB':>8}")
        for name, (sec, f, peak) in rows.items():
            print(
                f"{name:<42} {sec * 1e3:>9.1f} {sec / total:>7.1%} {f * tokens / 1e9:>8.2f} "
                f"{f * tokens / 1e12 / max(sec, 1e-9):>8.3f} "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}':>8}"
            )
        print(f"{'whole step, unstaged (train.py path)':<42} {whole * 1e3:>9.1f}")
        keep = persistent_bytes(model, opt, *(labeler,) * (labeler is not None))
        print(
            "peak MB: bytes in tensors allocated during the step and alive at their peak inside "
            f"the stage, on top of {keep / 2**20:.0f} MB of weights and AdamW "
            f"moments{' (student), source and SAE' if labeler else ''}"
        )


# -----------------------------------------------------------------------------
# CoCoMix/NTP time per FLOP, label cost and memory


def bench_bars(args):
    dev, T, tokens = args.device, args.block_size, args.batch_size * args.block_size
    X, Y = batch(args, dev)
    labeler = bench_labeler(args, dev)
    ntp, coco = student(args, "ntp", dev), student(args, "cocomix", dev)
    opt_ntp, opt_coco = optimizer(ntp), optimizer(coco)
    f_ntp, f_coco = flops_per_token(ntp, T), flops_per_token(coco, T)
    f_lab, f_src = sum(label_flops(labeler, T).values()), flops_per_token(labeler.source, T)
    src = labeler.source.config
    print(
        f"device={dev}, student {args.n_layer}L d={args.n_embd} C={args.n_concepts} "
        f"K={args.concept_topk} insert {args.insert_layer}; source {src.n_layer}L d={src.n_embd}, "
        f"SAE {labeler.sae.n_latents} latents k={labeler.sae.k} on block {labeler.layer}; {tokens} "
        f"tokens/step, medians of {args.rounds} rounds of {args.steps} step(s)"
    )
    for dtype in args.dtypes.split(","):
        ctx = autocast(dev, dtype)
        with ctx:
            cached = labeler(X, Y)
        src_step = source_train_step(labeler.source, X, Y, ctx)

        def labels_only():
            with ctx:
                labeler(X, Y)

        variants = {  # name: (step, FLOPs per token, what lives across steps)
            "ntp": (train_step(ntp, opt_ntp, X, Y, ctx), f_ntp, (ntp, opt_ntp)),
            "cocomix, labels on the fly": (
                train_step(coco, opt_coco, X, Y, ctx, labeler, args.lam),
                f_coco + f_lab,
                (coco, opt_coco, labeler),
            ),
            "cocomix, cached labels": (
                train_step(coco, opt_coco, X, Y, ctx, cached, args.lam),
                f_coco,
                (coco, opt_coco, cached),
            ),
            "labels alone": (labels_only, f_lab, (labeler,)),
            "source fwd+bwd (training)": (src_step, f_src, (src_step.model,)),
        }
        t = alternate({k: v[0] for k, v in variants.items()}, args, dev)
        print(
            f"\n{dtype}\n{'variant':<28} {'step ms':>9} {'tok/s':>8} {'GFLOP/tok':>10} "
            f"{'TFLOP/s':>8} {'peak MB':>8} {'kept MB':>8}"
        )
        peak = {}
        for k, (step, f, keep) in variants.items():
            kept = persistent_bytes(*keep)
            peak[k] = transient_peak(step, dev)[0] + kept
            print(
                f"{k:<28} {t[k] * 1e3:>9.1f} {tokens / t[k]:>8.0f} {f / 1e9:>10.4f} "
                f"{f * tokens / t[k] / 1e12:>8.3f} {peak[k] / 2**20:>8.0f} {kept / 2**20:>8.0f}"
            )
        fly, cache = (
            t["cocomix, labels on the fly"] / t["ntp"],
            t["cocomix, cached labels"] / t["ntp"],
        )
        rf_fly, rf_cache = (f_coco + f_lab) / f_ntp, f_coco / f_ntp
        lab = t["labels alone"] / t["source fwd+bwd (training)"]
        bar = lambda x, limit: f"{x:.2f} {'met' if x <= limit else 'NOT met'} (bar <= {limit})"
        print(
            f"cocomix/ntp step time, labels on the fly: {fly:.2f}x; / FLOP ratio with the label "
            f"FLOPs ({rf_fly:.2f}x) = {bar(fly / rf_fly, 1.15)}; / student FLOP ratio "
            f"({rf_cache:.2f}x) = {fly / rf_cache:.2f}"
        )
        print(
            f"cocomix/ntp step time, cached labels: {cache:.2f}x; / FLOP ratio ({rf_cache:.2f}x) = "
            f"{bar(cache / rf_cache, 1.3)}"
        )
        print(f"labels / source training step: time {bar(lab, 0.6)}; FLOPs {f_lab / f_src:.2f}")
        for k in ("cocomix, labels on the fly", "cocomix, cached labels"):
            print(f"peak memory {k} / ntp: {bar(peak[k] / peak['ntp'], 1.5)}")


# -----------------------------------------------------------------------------
# throughput per precision, and sparse mixing


def bench_throughput(args):
    dev, T, tokens = args.device, args.block_size, args.batch_size * args.block_size
    X, Y = batch(args, dev)
    labels = torch.randint(
        0,
        args.n_concepts,
        (args.batch_size, T, args.k_attr),
        generator=torch.Generator().manual_seed(0),
    ).to(dev)
    models, steps = {}, {}
    for mode in ("ntp", "cocomix") if args.compare else (args.mode,):
        models[mode] = student(args, mode, dev)
        opt = optimizer(models[mode])
        loss_fn = torch.compile(student_loss) if args.compile else student_loss
        for dtype in args.dtypes.split(","):
            steps[f"{mode}/{dtype}"] = train_step(
                models[mode],
                opt,
                X,
                Y,
                autocast(dev, dtype),
                labels if mode == "cocomix" else None,
                args.lam,
                loss_fn,
            )
    t = alternate(steps, args, dev)
    print(
        f"device={dev} tokens/step={tokens}, student only (cocomix: random labels), "
        f"medians of {args.rounds} alternating rounds of {args.steps} step(s)"
    )
    print(
        f"{'variant':<20} {'params':>9} {'step ms':>9} {'tok/s':>9} {'GFLOP/tok':>10} "
        f"{'TFLOP/s':>8} {'MFU':>6}"
    )
    for name in steps:
        m = models[name.split("/")[0]]
        fpt = flops_per_token(m, T)
        mfu = estimate_mfu(m, tokens, T, t[name], dev)
        print(
            f"{name:<20} {m.get_num_params() / 1e6:>8.2f}M {t[name] * 1e3:>9.1f} "
            f"{tokens / t[name]:>9.0f} {fpt / 1e9:>10.4f} "
            f"{fpt * tokens / t[name] / 1e12:>8.3f} {mfu:>6.1%}"
        )
    dts = args.dtypes.split(",")
    for mode in models:
        for dt in dts[1:]:
            print(
                f"{mode}: {dt} / {dts[0]} step time {t[f'{mode}/{dt}'] / t[f'{mode}/{dts[0]}']:.2f}"
            )
    if args.compare:
        rf = flops_per_token(models["cocomix"], T) / flops_per_token(models["ntp"], T)
        for dt in dts:
            r = t[f"cocomix/{dt}"] / t[f"ntp/{dt}"]
            print(
                f"{dt}: cocomix/ntp step time {r:.2f}x, FLOPs "
                f"{rf:.2f}x, time ratio / FLOP ratio {r / rf:.2f}"
            )


def bench_mixing(args):
    """Sparse mixing (gather K rows of W_cmp, scatter-add back) against the released code's dense
    tokens x C masked matrix times W_cmp, forward + backward."""
    C, K, d, N, dev = args.n_concepts, args.concept_topk, args.n_embd, args.tokens, args.device
    values, indices = torch.randn(N, C, device=dev).topk(K, dim=-1)
    values.requires_grad_(True)
    W = torch.randn(C, d, device=dev, requires_grad=True)
    g = torch.randn(N, d, device=dev)

    def sparse():
        torch.autograd.grad(sparse_mix(values, indices, W), (values, W), g)

    def dense():
        masked = torch.zeros(N, C, device=dev).scatter(1, indices, values)
        torch.autograd.grad(masked @ W, (values, W), g)

    t = alternate({"sparse": sparse, "dense": dense}, args, dev)
    print(
        f"mixing fwd+bwd, C={C} K={K} d={d} tokens={N} on {dev}: sparse {t['sparse'] * 1e3:.1f} "
        f"ms, dense {t['dense'] * 1e3:.1f} ms, speed-up "
        f"{t['dense'] / t['sparse']:.1f}x (medians of {args.rounds})"
    )


def bench_kd(args):
    """KD's training step two ways, alternating: the full B x T x V logits of teacher and student
    (ops.lm_loss_reference), and train.py's path, ops.lm_loss with the teacher's final hidden state
    and head, which makes both logits (and the gradient) a chunk of rows at a time."""
    dev = args.device
    source = bench_labeler(args, dev).source
    for dtype in args.dtypes.split(","):
        model, ctx = student(args, "ntp", dev), autocast(dev, dtype)
        opt = optimizer(model)
        X, Y = batch(args, dev)

        teacher = lambda idx: teacher_of(source, idx)
        steps = {
            "full logits": train_step(model, opt, X, Y, ctx, teacher=teacher, full_logits=True),
            "chunked": train_step(model, opt, X, Y, ctx, teacher=teacher),
        }
        peak = {k: transient_peak(fn, dev)[0] for k, fn in steps.items()}
        t = alternate(steps, args, dev)
        tokens = args.batch_size * args.block_size
        print(
            f"{dtype}: KD step, student {args.n_layer}L d={args.n_embd}, teacher {args.src_layer}L "
            f"d={args.src_embd}, {tokens} tokens; medians of "
            f"{args.rounds} x {args.steps} steps, alternating"
        )
        for k in steps:
            print(
                f"  {k:<12} {t[k] * 1e3:9.1f} ms  {tokens / t[k]:8.0f} tok/s  peak "
                f"{peak[k] / 2**20:7.0f} MiB"
            )
        print(
            f"  chunked / full logits: time {t['chunked'] / t['full logits']:.2f}, "
            f"peak memory {peak['chunked'] / peak['full logits']:.2f}"
        )


def main(argv=None):
    args = parse(argv)
    if args.side or args.vs_nanogpt:
        return bench_nanogpt.run(args)
    for flag, fn in (
        ("mixing", bench_mixing),
        ("split", bench_split),
        ("bars", bench_bars),
        ("kd", bench_kd),
    ):
        if getattr(args, flag):
            return fn(args)
    bench_throughput(args)


if __name__ == "__main__":
    main()
