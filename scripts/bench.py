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
    # NTP step against nanoGPT's model.py; CoCoMix vs NTP
    python -m scripts.bench --vs_nanogpt=PATH --n_embd=192 --batch_size=16 --dtypes=float32,bfloat16

torch.compile's graph-break check and the compiled GPU MFU measurement are in bench_compile.py,
which shares this file's options and helpers.

Defaults: a student of 4 layers, d=256, block 256, batch 8, C=8192 concepts, K=32, insert layer 1; a
concept source of 6 layers, d=256, with an SAE of 8192 latents (k=32) on block 2. Source and SAE get
random weights unless --source_ckpt / --sae_path name trained ones: the work of a step does not
depend on the weights. CoCoMix steps are train.py's: labels, the student's loss with the chunked LM
head, backward, gradient clipping, AdamW. `--tiny` shrinks every model to a smoke-test size.
"""

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch

from cocomix.flops import estimate_mfu, flops_per_token, label_flops, stage_flops
from cocomix.ops import lm_loss, lm_loss_reference, sparse_mix
from cocomix.runtime import keep_freed_memory
from model import (
    GPT,
    GPTConfig,
    interleave,
    load_frozen_gpt,
    standardise,
    teacher_of,
    training_loss,
)


def options(doc):
    """The options bench.py and bench_compile.py share: model sizes, timing, device, weights."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for k, v in dict(
        n_layer=4,
        n_head=4,
        n_embd=256,
        block_size=256,
        batch_size=None,
        n_concepts=8192,
        concept_topk=32,
        insert_layer=1,
        k_attr=4,
        src_layer=6,
        src_head=4,
        src_embd=256,
        sae_layer=2,
        sae_k=32,
        steps=None,
        warmup=None,
        rounds=None,
    ).items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--mix", default="interleave")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the student (always on CUDA for bench_compile.py --gpu_mfu)",
    )
    p.add_argument(
        "--source_ckpt",
        default="",
        help="a trained concept source (ckpt.pt); default: random weights",
    )
    p.add_argument("--sae_path", default="", help="a trained SAE for it; default: random weights")
    p.add_argument("--tiny", action="store_true", help="every model at smoke-test size")
    p.add_argument(
        "--no_cpu_heap",
        action="store_true",
        help="glibc's default allocation on a CPU (train.py's cpu_heap=False)",
    )
    return p


def settle(args, long_run=False):
    """--tiny's sizes, then the defaults left open (long_run: the CUDA MFU run's batch and step
    counts); on a CPU, the allocator as train.py sets it (cocomix/runtime.py, keep_freed_memory)
    unless --no_cpu_heap."""
    if not args.no_cpu_heap:
        keep_freed_memory(args.device)
    if args.tiny:
        args.__dict__.update(
            n_layer=2,
            n_head=2,
            n_embd=64,
            block_size=32,
            n_concepts=256,
            concept_topk=8,
            src_layer=2,
            src_head=2,
            src_embd=64,
            sae_layer=0,
            sae_k=8,
            tokens=256,
        )
    for k, v in dict(
        batch_size=2 if args.tiny else 16 if long_run else 8,
        steps=10 if long_run else 1,
        warmup=3 if long_run else 1,
        rounds=3 if long_run else 5,
    ).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


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
# the pieces of a training step


def sync(device):
    if "cuda" in str(device):
        torch.cuda.synchronize()


def autocast(device, dtype):
    return torch.autocast(
        "cuda" if "cuda" in str(device) else "cpu",
        dtype=getattr(torch, dtype),
        enabled=dtype != "float32",
    )


def student(args, mode, device):
    cfg = dict(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        insert_layer=args.insert_layer,
    )
    if mode == "cocomix":
        cfg.update(n_concepts=args.n_concepts, concept_topk=args.concept_topk, mix=args.mix)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).to(device)


def batch(args, device, seed=0):
    """Random GPT-2 tokens (B, T) and their next tokens."""
    xy = torch.randint(
        0,
        50257,
        (args.batch_size, args.block_size + 1),
        generator=torch.Generator().manual_seed(seed),
    )
    return xy[:, :-1].to(device), xy[:, 1:].contiguous().to(device)


def bench_labeler(args, device):
    """train.py's ConceptLabeler: a trained source and SAE when given, else random ones of the asked
    shape (args.n_concepts follows a loaded SAE's width)."""
    from sae import SAE, ConceptLabeler

    if args.source_ckpt:
        source = load_frozen_gpt(args.source_ckpt, device)
    else:
        torch.manual_seed(1)
        source = (
            GPT(
                GPTConfig(
                    n_layer=args.src_layer,
                    n_head=args.src_head,
                    n_embd=args.src_embd,
                    block_size=args.block_size,
                )
            )
            .to(device)
            .eval()
            .requires_grad_(False)
        )
    if args.sae_path:
        sae = SAE.load(args.sae_path)
        layer = sae.meta.get("layer", args.sae_layer)
        args.sae_layer, args.sae_k, args.n_concepts = layer, sae.k, sae.n_latents
    else:
        sae = SAE(source.config.n_embd, args.n_concepts, args.sae_k, {"layer": args.sae_layer})
    return ConceptLabeler(source, sae.to(device), args.sae_layer, args.k_attr)


def optimizer(model):
    return model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), next(model.parameters()).device.type)


def student_loss(model, X, Y, labels=None, lam=0.1, teacher=None, lam_kd=0.1, full_logits=False):
    """train.py's loss (model.training_loss), the mode implied by the arguments: KD given teacher =
    (its final hidden state, its head weight), CoCoMix given labels, NTP otherwise. full_logits: the
    same loss from the whole B x T x V logits (ops.lm_loss_reference), what the chunked loss is
    measured against."""
    mode = "kd" if teacher is not None else "cocomix" if labels is not None else "ntp"
    head_loss = lm_loss_reference if full_logits else lm_loss
    return training_loss(model, X, Y, mode, labels, teacher, lam, lam_kd, head_loss=head_loss)[0]


def train_step(
    model,
    opt,
    X,
    Y,
    ctx,
    labels=None,
    lam=0.1,
    loss_fn=student_loss,
    teacher=None,
    full_logits=False,
):
    """train.py's step. labels: a callable computes them now (on the fly), a tensor is a cache hit.
    loss_fn: student_loss or torch.compile(student_loss). teacher: a callable X -> (final hidden
    state, head weight) for KD, e.g. model.teacher_of. full_logits: see student_loss."""

    def step():
        with ctx:
            y = labels(X, Y) if callable(labels) else labels
            with torch.no_grad():
                t = teacher(X) if teacher is not None else None
            loss = loss_fn(model, X, Y, y, lam, teacher=t, full_logits=full_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def source_train_step(source, X, Y, ctx):
    """Forward + backward with parameter gradients of a trainable copy of the concept source: the
    yardstick for what its labels cost (no optimizer step)."""
    src = copy.deepcopy(source).train().requires_grad_(True)

    def step():
        with ctx:
            loss = student_loss(src, X, Y)
        loss.backward()
        src.zero_grad(set_to_none=True)

    step.model = src
    return step


def alternate(fns, args, device, faults_out=None):
    """Median seconds per call of each fn; the fns take turns (A, B, A, B, ...) so that the
    machine's noise falls on all of them alike. faults_out: a dict to receive each fn's median
    minor page faults per call."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    sync(device)
    times, faults = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(args.rounds):  # the order reversed every other round: neither goes first always
        for k, fn in fns.items() if r % 2 == 0 else reversed(fns.items()):
            f0 = minor_faults()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / args.steps)
            faults[k].append((minor_faults() - f0) / args.steps)
    if faults_out is not None:
        faults_out.update({k: statistics.median(v) for k, v in faults.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def minor_faults():
    """This process's minor page faults so far: a CPU step that maps fresh memory shows here."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# -----------------------------------------------------------------------------
# memory


def persistent_bytes(*objs):
    """Bytes of what lives across steps: modules' parameters and buffers (a labeler's source and
    SAE), optimizer moments, tensors such as cached labels. Shared storage is counted once."""
    tensors = []
    for o in objs:
        if hasattr(o, "sae"):  # a ConceptLabeler
            tensors += [*o.source.parameters(), *o.source.buffers(), *o.sae.parameters()]
        elif isinstance(o, torch.nn.Module):
            tensors += [*o.parameters(), *o.buffers()]
        elif isinstance(o, torch.optim.Optimizer):
            tensors += [
                t for state in o.state.values() for t in state.values() if torch.is_tensor(t)
            ]
        else:
            tensors.append(o)
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


def transient_peak(fn, device):
    """Run fn once; return (peak, {stage: peak}) of the bytes in tensors allocated during fn and
    still alive, i.e. above what existed before it (weights, optimizer moments), overall and inside
    each record_function range named 'stage:...'. CPU: the profiler's running total of torch's CPU
    allocator (allocations made before fn are not tracked, so their frees do not count either;
    allocator caching and fragmentation are not included). CUDA: torch.cuda.max_memory_allocated
    less what was allocated before; no per-stage peaks."""
    if "cuda" in str(device):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base, {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = [(e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]"]
    peaks = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name", "").startswith("stage:"):
            inside = [m for t, m in mem if e["ts"] <= t <= e["ts"] + e["dur"]]
            if inside:
                name = e["name"][len("stage:") :]
                peaks[name] = max(peaks.get(name, 0), max(inside))
    return max((m for _, m in mem), default=0), peaks


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


# -----------------------------------------------------------------------------
# --vs_nanogpt: this project's training step against nanoGPT's, on the same model, weights and batch


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
        "scripts.bench",
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


def main(argv=None):
    args = parse(argv)
    if args.side:
        return side_times(args)
    if args.vs_nanogpt:
        # both steps eager: nanoGPT's compile is its own train.py's, not its model's
        if args.compile:
            raise SystemExit(
                "error: --vs_nanogpt times eager steps; --compile does not apply to it"
            )
        return bench_vs_nanogpt(args)
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
