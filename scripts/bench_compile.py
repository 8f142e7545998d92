"""
torch.compile: graph-break check and compiled GPU MFU. It shares bench.py's options (model sizes,
--device, --tiny, --source_ckpt, --sae_path, --steps/--warmup/--rounds) and helpers, which live in
bench_common.py.

    # graph breaks and recompiles under torch.compile
    python -m scripts.bench_compile --check --tiny
    # the same graphs, compiled quicker
    python -m scripts.bench_compile --check --tiny --backend=aot_eager
    # CUDA: GPT-2 124M NTP and the 69M CoCoMix MFU
    python -m scripts.bench_compile --gpu_mfu
    # smoke test of that path (eager; --compile compiles)
    python -m scripts.bench_compile --gpu_mfu --device=cpu --tiny
    # compiled (inductor) against eager: first step and steady step, NTP and CoCoMix, per precision
    python -m scripts.bench_compile --vs_eager --dtypes=float32,bfloat16
"""

import argparse
import os
import time

import torch

from cocomix.flops import device_peak_flops, flops_per_token, label_flops
from cocomix.ops import default_lm_chunk
from cocomix.weights import first_line
from model import GPT, GPTConfig
from scripts.bench_common import (
    alternate,
    autocast,
    batch,
    bench_labeler,
    optimizer,
    options,
    settle,
    student,
    student_loss,
    sync,
    train_step,
)


def parse(argv=None):
    p = options(__doc__)
    p.add_argument(
        "--check",
        action="store_true",
        help="graph breaks and recompiles of the students and the labeler",
    )
    p.add_argument(
        "--gpu_mfu", action="store_true", help="GPT-2 124M NTP and the 69M CoCoMix student's MFU"
    )
    p.add_argument(
        "--vs_eager",
        action="store_true",
        help="train steps compiled against eager: first step, steady step, ratio",
    )
    p.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend for --check and --vs_eager (aot_eager is quick)",
    )
    p.add_argument("--dtypes", default="float32", help="--vs_eager: comma-separated precisions")
    p.add_argument(
        "--variants",
        default="ntp,cached,on_the_fly",
        help="--gpu_mfu: which steps, of ntp (GPT-2 124M), ntp_eager (the same, not compiled), "
        "cached and on_the_fly (the CoCoMix student with cached labels or labels made each step)",
    )
    p.add_argument("--modes", default="ntp,cocomix", help="--vs_eager: comma-separated objectives")
    args = p.parse_args(argv)
    if args.check + args.gpu_mfu + args.vs_eager != 1:
        p.error("give one of --check, --gpu_mfu, --vs_eager")
    return settle(args, long_run=args.gpu_mfu and "cuda" in args.device and not args.tiny)


# -----------------------------------------------------------------------------
# torch.compile: graph breaks and recompiles


def explain(fn, *a, **kw):
    """Graph count and break reasons of fn under dynamo (it traces forwards; a custom
    autograd.Function's backward is traced with it, when the Function is called). Prints them and
    returns dynamo's result."""
    import torch._dynamo as dynamo

    dynamo.reset()
    ex = dynamo.explain(fn)(*a, **kw)
    here, reasons = os.path.dirname(os.path.abspath(__file__)), {}
    for r in ex.break_reasons:
        ours = [f for f in r.user_stack if os.path.dirname(os.path.abspath(f.filename)) == here][
            -3:
        ]
        key = (
            r.reason.strip().splitlines()[0]
            + " ["
            + " <- ".join(
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(ours)
            )
            + "]"
        )
        reasons[key] = reasons.get(key, 0) + 1
    print(
        f"  explain: {ex.graph_count} graph(s), {ex.graph_break_count} break(s), {ex.op_count} ops"
    )
    for k, n in reasons.items():
        print(f"    break x{n}: {k}")
    return ex


def compile_check(args):
    """NTP and CoCoMix students (forward + loss + backward) and the labeler: graph breaks, then a
    compiled run as train.py makes it (train steps, an evaluation in eval mode without grad, train
    again). Graphs made after that warm-up are recompiles; every recompile is listed with the guard
    that failed."""
    import logging

    import torch._dynamo as dynamo
    from torch._dynamo.guards import recompiles_log
    from torch._dynamo.utils import counters

    recompiles = []
    torch._logging.set_logs(recompiles=True)
    recompiles_log.addHandler(
        type(
            "Catch", (logging.Handler,), {"emit": lambda self, r: recompiles.append(r.getMessage())}
        )()
    )
    recompiles_log.propagate = False  # summarised below instead of printed as they come
    X, Y = batch(args, args.device)
    labeler = bench_labeler(args, args.device)
    labels = labeler(X, Y)
    results = {}
    for mode in ("ntp", "cocomix"):
        model = student(args, mode, args.device)
        lab = labels if mode == "cocomix" else None
        print(f"\n{mode} student, backend={args.backend}")
        ex = explain(student_loss, model, X, Y, lab, args.lam)
        results[mode] = {
            "graphs": ex.graph_count,
            "graph_breaks": ex.graph_break_count,
            "eager_loss": None,
        }
        ref = student_loss(model, X, Y, lab, args.lam)
        dynamo.reset()
        counters.clear()
        recompiles.clear()
        loss_fn = torch.compile(student_loss, backend=args.backend)
        step = train_step(
            model, optimizer(model), X, Y, autocast(args.device, "float32"), lab, args.lam, loss_fn
        )

        def evaluate():
            model.eval()
            with torch.no_grad():
                loss_fn(model, X, Y, lab, args.lam)
            model.train()

        try:
            t0 = time.perf_counter()
            loss = step()
            t0 = time.perf_counter() - t0
            evaluate(), step()
            warm, n_warm = counters["stats"]["unique_graphs"], len(recompiles)
            for fn in (step, step, step, evaluate, step):
                fn()
        except Exception as e:  # a failure to compile is a finding, not the end of the check
            results[mode]["failed"] = first_line(e, 300)
            print(f"  compiled run FAILED: {results[mode]['failed']}")
            continue
        results[mode].update(
            eager_loss=ref.item(),
            compiled_loss=loss.item(),
            recompiles_warmup=n_warm,
            recompiles_after=len(recompiles) - n_warm,
            graphs_after=counters["stats"]["unique_graphs"] - warm,
        )
        print(
            f"  compiled fwd+loss+bwd: first step {t0:.1f} s, loss {loss.item():.5f} (eager "
            f"{ref.item():.5f}); {warm} graph(s) after warm-up (train + eval), "
            f"{counters['stats']['unique_graphs'] - warm} more after 4 further train steps and an "
            f"eval; recompiles: {n_warm} in warm-up, {len(recompiles) - n_warm} after"
        )
        for r in recompiles:
            print("    " + " | ".join(line.strip() for line in r.splitlines()[:3])[:300])
    print("\nconcept labeler (ConceptLabeler.__call__)")
    explain(labeler, X, Y)
    print("a block of the concept source (what --gpu_mfu compiles of it)")
    explain(labeler.source.transformer.h[0], labeler.source.embed(X))
    return results


# -----------------------------------------------------------------------------
# GPU MFU: GPT-2 124M NTP and the paper's 69M CoCoMix setup


def gpu_mfu(args):
    """NTP on GPT-2 124M, and the paper's 69M CoCoMix student (8 layers, d=512, insert layer 3,
    C=32768, K=32) with GPT-2 124M as concept source and a 32768-latent SAE (k=32) on its block 5,
    at block 1024: bf16 autocast, torch.compile on CUDA, fused AdamW (configure_optimizers on CUDA).
    Random weights and tokens, so it runs offline. MFU = flops.flops_per_token x tokens/s / the
    device's dense bf16 peak. The LM-head loss takes ops.lm_loss's chunk for the device: 4096 rows
    on CUDA (dynamo unrolls the chunk loop, and the CPU's 256 would make 64 copies of its body at
    batch 16 x 1024, a compile of minutes)."""
    dev, cuda = args.device, "cuda" in args.device
    compiled = args.compile or cuda
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not args.tiny:
        args = argparse.Namespace(
            **{
                **vars(args),
                **dict(
                    n_layer=8,
                    n_head=8,
                    n_embd=512,
                    block_size=1024,
                    insert_layer=3,
                    n_concepts=32768,
                    concept_topk=32,
                    src_layer=12,
                    src_head=12,
                    src_embd=768,
                    sae_layer=5,
                    sae_k=32,
                ),
            }
        )
    T, ctx = args.block_size, autocast(dev, "bfloat16")
    X, Y = batch(args, dev)
    tokens = X.numel()
    want = args.variants.split(",")
    if unknown := set(want) - {"ntp", "ntp_eager", "cached", "on_the_fly"}:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}")
    loss_fn = torch.compile(student_loss) if compiled else student_loss
    cfg, variants = f"{args.n_layer}L d={args.n_embd}", {}  # name: (step, student FLOPs/token)
    f_lab = 0
    if "ntp_eager" in want and "ntp" not in want:
        raise SystemExit("--variants: ntp_eager goes with ntp (the same model, eager)")
    if "ntp" in want:
        torch.manual_seed(0)
        ntp = GPT(
            GPTConfig(
                n_layer=args.src_layer, n_head=args.src_head, n_embd=args.src_embd, block_size=T
            )
        ).to(dev)
        opt_ntp = optimizer(ntp)
        variants[f"ntp {args.src_layer}L d={args.src_embd}"] = (
            train_step(ntp, opt_ntp, X, Y, ctx, loss_fn=loss_fn),
            flops_per_token(ntp, T),
        )
    if "ntp_eager" in want:  # the same model's step without torch.compile, in the same turns
        variants[f"ntp {args.src_layer}L d={args.src_embd}, eager"] = (
            train_step(ntp, opt_ntp, X, Y, ctx, loss_fn=student_loss),
            flops_per_token(ntp, T),
        )
    if "cached" in want or "on_the_fly" in want:
        labeler = bench_labeler(args, dev)
        coco = student(args, "cocomix", dev)
        # the source's blocks in place: whichever way the labeler walks them, they run compiled
        if compiled and "on_the_fly" in want:
            for block in labeler.source.transformer.h:
                block.compile()
        with ctx:
            cached = labeler(X, Y)
        f_coco, f_lab = flops_per_token(coco, T), sum(label_flops(labeler, T).values())
        opt_coco = optimizer(coco)
        if "cached" in want:
            variants[f"cocomix {cfg}, cached labels"] = (
                train_step(coco, opt_coco, X, Y, ctx, cached, loss_fn=loss_fn),
                f_coco,
            )
        if "on_the_fly" in want:
            variants[f"cocomix {cfg}, labels on the fly"] = (
                train_step(coco, opt_coco, X, Y, ctx, labeler, loss_fn=loss_fn),
                f_coco,
            )
    t0 = time.perf_counter()
    for name, (
        step,
        _,
    ) in variants.items():  # the compiles happen here, so that the timing below is warm
        step()
        sync(dev)
        print(f"first step of {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
    t = alternate({k: v[0] for k, v in variants.items()}, args, dev)
    peak = device_peak_flops(dev)
    print(
        f"\n{torch.cuda.get_device_name(dev) if cuda else 'cpu'}, torch {torch.__version__}, bf16 "
        f"autocast, compile={compiled}, {tokens} tokens/step (batch {args.batch_size} x {T}), "
        f"LM-head loss in chunks of {default_lm_chunk(dev)} rows (ops.lm_loss's default here), "
        f"peak {peak / 1e12:.0f} TFLOP/s, medians of {args.rounds} x {args.steps} steps"
    )
    print(
        f"{'variant':<36} {'step ms':>9} {'tok/s':>9} {'GFLOP/tok':>10} {'MFU':>6} "
        f"{'MFU +labels':>11} {'peak GiB':>9}"
    )
    results = {}
    for k, (step, f) in variants.items():
        mem = 0.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            step()
            mem = torch.cuda.max_memory_allocated() / 2**30
        mfu = f * tokens / t[k] / peak
        with_labels = (f + f_lab) * tokens / t[k] / peak if "on the fly" in k else mfu
        print(
            f"{k:<36} {t[k] * 1e3:>9.1f} {tokens / t[k]:>9.0f} {f / 1e9:>10.3f} {mfu:>6.1%} "
            f"{with_labels:>11.1%} {mem:>9.1f}"
        )
        results[k] = {
            "step_ms": t[k] * 1e3,
            "tokens_per_s": tokens / t[k],
            "gflop_per_token": f / 1e9,
            "mfu": mfu,
            "mfu_with_labels": with_labels,
            "peak_gib": mem,
        }
    return results


# -----------------------------------------------------------------------------
# compiled against eager: does torch.compile pay at this size, on this device?


def vs_eager(args):
    """train.py's step (the loss compiled as train.py compiles its objective; labels a cached
    tensor, so that only the student differs) eager and compiled, in turns (bench.alternate):
    the first compiled step (the compile) and the median steady step of each, per objective and
    precision. A ratio above 1 means the compiled step is slower."""
    dev = args.device
    X, Y = batch(args, dev)
    labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr), device=dev)
    print(
        f"{torch.cuda.get_device_name(dev) if 'cuda' in dev else 'cpu'}, torch {torch.__version__}"
        f", {torch.get_num_threads()} threads; student {args.n_layer}L d={args.n_embd}, batch "
        f"{args.batch_size} x {args.block_size}, C={args.n_concepts}, backend={args.backend}; "
        f"medians of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'objective':<9} {'dtype':<9} {'eager ms':>9} {'compiled ms':>12} {'ratio':>6} "
        f"{'first compiled step s':>22}"
    )
    results = {}
    for mode in args.modes.split(","):
        for dt in args.dtypes.split(","):
            torch._dynamo.reset()
            lab = labels if mode == "cocomix" else None
            steps = {}
            for name, fn in (
                ("eager", student_loss),
                ("compiled", torch.compile(student_loss, backend=args.backend)),
            ):
                model = student(args, mode, dev)
                steps[name] = train_step(
                    model, optimizer(model), X, Y, autocast(dev, dt), lab, args.lam, fn
                )
            t0 = time.perf_counter()
            steps["compiled"]()
            sync(dev)
            first = time.perf_counter() - t0
            t = alternate(steps, args, dev)
            ratio = t["compiled"] / t["eager"]
            print(
                f"{mode:<9} {dt:<9} {t['eager'] * 1e3:>9.1f} {t['compiled'] * 1e3:>12.1f} "
                f"{ratio:>6.2f} {first:>22.1f}",
                flush=True,
            )
            results[f"{mode} {dt}"] = {
                "eager_ms": t["eager"] * 1e3,
                "compiled_ms": t["compiled"] * 1e3,
                "ratio": ratio,
                "first_compiled_step_s": first,
            }
    return results


def main(argv=None):
    args = parse(argv)
    if args.vs_eager:
        return vs_eager(args)
    return compile_check(args) if args.check else gpu_mfu(args)


if __name__ == "__main__":
    main()
