"""
The prepared GPU check: one command on a fresh one-GPU machine, no network, a few minutes.

    # DIR: gutenberg/ (and tinyshakespeare/, lambada/)
    bash scripts/gpu_check.sh --data_root=DIR
    # everything at smoke-test size, on the CPU if no GPU
    bash scripts/gpu_check.sh --dry_run

In order, each part's figures going into OUT/gpu_check.json and OUT/gpu_check.md as it finishes:
 1. correctness on the device: sparse mixing and the LM-head loss (fp32, bf16, fp16, KD) against
    their plain references (cocomix/ops.py), and the concept labels against the same labels made on
    the CPU;
 2. the compiled student against eager: losses and every parameter gradient, NTP and CoCoMix, then
    bench_compile.py's graph-break and recompile check;
 3. MFU: GPT-2 124M NTP and the paper's 69M CoCoMix student, bf16, torch.compile, fused AdamW
    (bench_compile.py --gpu_mfu);
 4. with the minutes left: reproduce.py's `cpu` comparison (its own concept source and SAE, trained
    here on Gutenberg) at a larger budget, NTP and CoCoMix, stopped at the deadline with SIGTERM, so
    that the running stage saves (its stages resume: rerun the same command to go on).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import scripts.bench as bench
import scripts.bench_compile as bench_compile
from cocomix.ops import lm_loss, lm_loss_reference, sparse_mix, sparse_mix_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    """Relative difference ||a - b|| / ||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check_ops(dev, small):
    """Sparse mixing and the LM-head loss on the device against their references, values and
    gradients."""
    out = {}
    torch.manual_seed(0)
    N, C, K, d = (256, 512, 8, 32) if small else (8192, 32768, 32, 512)
    values = torch.randn(N, K, device=dev, requires_grad=True)
    indices = torch.randn(N, C, device=dev).topk(K, dim=-1).indices
    W = torch.randn(C, d, device=dev, requires_grad=True)
    g = torch.randn(N, d, device=dev)
    fast = [
        sparse_mix(values, indices, W),
        *torch.autograd.grad(sparse_mix(values, indices, W), (values, W), g),
    ]
    ref = [
        sparse_mix_reference(values, indices, W),
        *torch.autograd.grad(sparse_mix_reference(values, indices, W), (values, W), g),
    ]
    out["sparse_mix fp32: output, grad values, grad W (rel. diff)"] = [
        rel(a, b) for a, b in zip(fast, ref)
    ]
    N, V, d = (512, 1000, 32) if small else (32768, 50257, 512)
    x = (torch.randn(N, d, device=dev) * 0.5).requires_grad_()
    Wh = (torch.randn(V, d, device=dev) * 0.1).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    t[::7] = -1
    tx, tW = torch.randn(N, 48, device=dev), torch.randn(V, 48, device=dev) * 0.1
    # the float64 reference's gradients, from the full logits
    with torch.autocast(dev, enabled=False):
        ref = torch.autograd.grad(lm_loss_reference(x.double(), Wh.double(), t), (x, Wh))
        ref_kd = torch.autograd.grad(
            lm_loss_reference(x.double(), Wh.double(), t, (tx.double(), tW.double()), 0.1)[0],
            (x, Wh),
        )
    for dt in ("float32", "bfloat16", "float16"):
        with bench.autocast(dev, dt):
            grads = torch.autograd.grad(lm_loss(x, Wh, t), (x, Wh))
            grads_kd = torch.autograd.grad(
                lm_loss(x, Wh, t, teacher=(tx, tW), lam_kd=0.1)[0], (x, Wh)
            )
        out[f"lm_loss {dt}: grad x, grad W vs float64 full logits (rel. diff)"] = [
            rel(a, b) for a, b in zip(grads, ref)
        ]
        out[f"lm_loss KD {dt}: grad x, grad W (rel. diff)"] = [
            rel(a, b) for a, b in zip(grads_kd, ref_kd)
        ]
    return out


def check_labels(dev, small):
    """The concept labels of one batch made on the device and on the CPU (same source, SAE, tokens):
    the fraction of label slots that agree, in fp32 and under bf16 autocast (the source pass in
    bf16)."""
    args = bench.parse(["--tiny"] if small else [])
    X, Y = bench.batch(args, "cpu")
    cpu = bench.bench_labeler(args, "cpu")
    gpu = bench.bench_labeler(args, dev)
    out = {}
    for dt in ("float32", "bfloat16"):
        with bench.autocast("cpu", dt):
            a = cpu(X, Y)
        with bench.autocast(dev, dt):
            b = gpu(X.to(dev), Y.to(dev)).cpu()
        out[f"labels {dt}: fraction of slots equal, device vs CPU"] = (
            (a.sort(-1).values == b.sort(-1).values).float().mean().item()
        )
    return out


def check_topk_order(dev):
    """label_fill='released' ranks zero-score latents as CUDA's torch.topk does (sae.topk_as_cuda:
    +0.0 above -0.0, equal values lowest index first), emulated on every device. Here against
    torch.topk on the device, on rows of +0.0 and -0.0 with a few positive and tied scores, at a
    small width and at the SAE's 32768 (CUDA's multi-block top-k): the fraction of rows with the
    same K_attr = 4 latents (1.0 on a GPU; a CPU's topk calls +0.0 and -0.0 equal)."""
    from sae import topk_as_cuda

    g, out = torch.Generator().manual_seed(0), {}
    for C in (96, 32768):
        x = torch.zeros(256, C) * torch.randn(256, C, generator=g)  # +0.0 and -0.0
        cols = torch.randint(0, C, (256, 3), generator=g)
        x.scatter_(1, cols, torch.tensor([1.0, 1.0, 0.5]).expand(256, 3))  # ties among positives
        want = x.to(dev).topk(4).indices.cpu().sort(-1).values
        same = (topk_as_cuda(x, 4).sort(-1).values == want).all(-1).float().mean().item()
        out[f"released fill, C={C}: rows where topk_as_cuda equals torch.topk on the device"] = same
    return out


def check_compiled(dev, small):
    """The compiled student (bench.student_loss: objective.training_loss, train.py's loss) against
    eager, fp32 without TF32: loss and the largest relative difference over the parameter gradients.
    """
    args = bench.parse(["--tiny"] if small else ["--batch_size=8"])
    X, Y = bench.batch(args, dev)
    labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr), device=dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for mode in ("ntp", "cocomix"):
        model = bench.student(args, mode, dev)
        lab = labels if mode == "cocomix" else None
        res = []
        compiled = torch.compile(bench.student_loss, backend="aot_eager" if small else "inductor")
        for fn in (bench.student_loss, compiled):
            loss = fn(model, X, Y, lab)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            res.append((loss.item(), grads))
        out[f"compiled {mode}: loss eager, loss compiled, max grad rel. diff"] = [
            res[0][0],
            res[1][0],
            max(rel(a, b) for a, b in zip(res[1][1], res[0][1])),
        ]
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def run_until(cmd, seconds, grace=30):
    """Runs cmd from the repo root until it ends or `seconds` pass, then stops it with SIGTERM,
    which reproduce.py passes on to its running stage (train.py and sae.py save a checkpoint and
    exit, so a rerun resumes there), and with SIGKILL if it is still running `grace` seconds later.
    Returns (exit status, or None if stopped at the deadline; the output, stdout and stderr
    together)."""
    # a file, not a pipe: a long output cannot block the child
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            rc = None
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def markdown(results):
    lines = ["| part | figure | value |", "|---|---|---|"]
    for part, figures in results.items():
        for k, v in figures.items() if isinstance(figures, dict) else [("", figures)]:
            v = json.dumps(v, default=str)
            lines.append(f"| {part} | {k} | {v[:300]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry_run", action="store_true", help="smoke-test sizes, CPU if there is no GPU"
    )
    p.add_argument("--minutes", type=float, default=8.0, help="the whole check's time budget")
    p.add_argument(
        "--data_root",
        default=os.environ.get("COCOMIX_DATA", ""),
        help="holds gutenberg/ for part 4",
    )
    p.add_argument("--out_dir", default="out/gpu_check")
    a = p.parse_args(argv)
    deadline = time.time() + 60 * a.minutes
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.dry_run:
        sys.exit("error: no GPU here; --dry_run runs the check at smoke-test size on the CPU")
    os.makedirs(a.out_dir, exist_ok=True)
    small = a.dry_run
    results = {
        "machine": {
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "dry_run": a.dry_run,
        }
    }

    def save():
        with open(os.path.join(a.out_dir, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(a.out_dir, "gpu_check.md"), "w") as f:
            f.write(markdown(results))

    fast = ["--tiny", "--rounds=1", "--warmup=0", "--steps=1"] if small else []
    parts = {
        "1 ops on the device": lambda: check_ops(dev, small),
        "1 labels, device vs CPU": lambda: check_labels(dev, small),
        "1 released fill, zero-score order": lambda: check_topk_order(dev),
        "2 compiled vs eager": lambda: check_compiled(dev, small),
        "2 graph breaks and recompiles": lambda: bench_compile.compile_check(
            bench_compile.parse(
                ["--check", f"--device={dev}", *fast, *(["--backend=aot_eager"] if small else [])]
            )
        ),
        "3 MFU": lambda: bench_compile.gpu_mfu(
            bench_compile.parse(["--gpu_mfu", f"--device={dev}", *fast])
        ),
    }
    failed = False
    for name, fn in parts.items():
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:  # a failing part is a finding; the others still run
            failed = True
            results[name] = {
                "FAILED": f"{type(e).__name__}: {e}"[:500],
                "traceback": traceback.format_exc()[-1500:],
            }
        results[name] = (
            {**results[name], "seconds": round(time.time() - t0, 1)}
            if isinstance(results[name], dict)
            else results[name]
        )
        print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
        save()
    left = deadline - time.time() - 20
    preset = "tiny" if small else "cpu"
    cmd = [
        sys.executable,
        "reproduce.py",
        f"--preset={preset}",
        f"--out_dir={os.path.join(a.out_dir, 'reproduce_' + preset)}",
        "--seeds=1",
        "--methods=ntp,cocomix",
        f"--data_root={a.data_root}",
    ]
    if not small:
        cmd += [
            "--set",
            "max_iters=2304",
            "eval_interval=288",
        ]  # 4x the CPU comparison's longest runs: 9.4M tokens
    if left > 60:
        t0 = time.time()
        rc, output = run_until(cmd, left - 30, grace=30)
        results["4 comparison"] = {
            "command": " ".join(cmd[1:]),
            "returncode": rc,
            "tail": output[-4000:],
        }
        if rc is None:
            results["4 comparison"]["stopped"] = (
                f"at the deadline after {time.time() - t0:.0f} s, its running stage "
                "saved; rerun the check (or the command) to go on from there"
            )
        failed |= rc not in (0, None)
    else:
        results["4 comparison"] = {"skipped": f"{left:.0f} s left"}
    save()
    print(markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
