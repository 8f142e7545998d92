"""
What every bench script shares: the options (model sizes, timing, device, weights) and their
defaults, the models and batch of a bench, train.py's step and loss, the alternating timer, and the
memory counters. bench.py, bench_nanogpt.py and bench_compile.py import it; it imports none of them.

    python -m scripts.bench_common --help    # the shared options
"""

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch

from cocomix.ops import lm_loss, lm_loss_reference
from cocomix.runtime import keep_freed_memory
from model import GPT, GPTConfig, load_frozen_gpt, training_loss


def options(doc):
    """The options every bench shares: model sizes, timing, device, weights."""
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


if __name__ == "__main__":
    options(__doc__).parse_args()
