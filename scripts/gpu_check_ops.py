"""
The GPU check's numerical parts, run by scripts/gpu_check.py as parts 2-5 (alone: `python -m
scripts.gpu_check_ops [--dry_run]`): the ops of cocomix/ops.py on the device against their float64
references, the concept labels made on the device against the CPU's, the zero-score order of
label_fill='released' against the device's torch.topk, and the compiled CoCoMix student against
eager. Each returns its figures as a dict.
"""

import torch

from cocomix.ops import (
    default_lm_chunk,
    lm_loss,
    lm_loss_reference,
    sparse_mix,
    sparse_mix_reference,
)
from scripts.bench import parse
from scripts.bench_common import autocast, batch, bench_labeler, student, student_loss

# part 2's sizes: sparse mixing at N_mix rows of C latents (top K) into d_mix, the LM-head loss
# at N rows of V logits from d; the float64 references ref_chunk rows at a time
OPS = dict(N_mix=8192, C=32768, K=32, d_mix=512, N=32768, V=50257, d=512, ref_chunk=4096)


def rel(a, b):
    """Relative difference ||a - b|| / ||b|| in float64, a 0-d tensor (floats() reads it)."""
    a, b = a.double(), b.double()
    return (a - b).norm() / b.norm().clamp(min=1e-30)


def lm_reference_grads(x, W, targets, teacher=None, lam_kd=0.1, rows=4096):
    """The gradients in (x, W) of lm_loss_reference (the loss from full float64 logits), made
    `rows` rows at a time: every chunk's mean loss weighted by its share of the valid targets, so
    that the sum is the mean over all of them. A full N x V float64 pass at N = 32768 would hold
    several 13 GB copies of the logits; a chunk holds 1/8 of one. Every chunk needs a valid target.
    """
    n = (targets >= 0).sum()
    Wd = W.detach().double()
    grad_x, grad_W = torch.empty_like(x), torch.zeros_like(Wd)
    for s in range(0, x.size(0), rows):
        xc = x[s : s + rows].detach().double().requires_grad_()
        Wc = Wd.detach().requires_grad_()
        t = targets[s : s + rows]
        if teacher is None:
            loss = lm_loss_reference(xc, Wc, t)
        else:
            tx, tW = teacher[0][s : s + rows].double(), teacher[1].double()
            loss = lm_loss_reference(xc, Wc, t, (tx, tW), lam_kd)[0]
        gx, gW = torch.autograd.grad(loss * ((t >= 0).sum() / n), (xc, Wc))
        grad_x[s : s + rows] = gx
        grad_W += gW
    return grad_x, grad_W.to(W.dtype)


def check_ops(dev, small, chunk=None):
    """Sparse mixing and the LM-head loss on the device against their references, values and
    gradients (relative differences, 0-d tensors). chunk: the LM head's rows per chunk (default:
    ops.lm_loss's for the device; the memory test passes CUDA's)."""
    out, o = {}, OPS
    torch.manual_seed(0)
    N, C, K, d = (256, 512, 8, 32) if small else (o["N_mix"], o["C"], o["K"], o["d_mix"])
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
    del values, indices, W, g, fast, ref
    N, V, d = (512, 1000, 32) if small else (o["N"], o["V"], o["d"])
    rows = 128 if small else o["ref_chunk"]
    chunk = chunk or default_lm_chunk(dev)
    x = (torch.randn(N, d, device=dev) * 0.5).requires_grad_()
    Wh = (torch.randn(V, d, device=dev) * 0.1).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    t[::7] = -1
    tx, tW = torch.randn(N, 48, device=dev), torch.randn(V, 48, device=dev) * 0.1
    with torch.autocast(torch.device(dev).type, enabled=False):
        ref = lm_reference_grads(x, Wh, t, rows=rows)
        ref_kd = lm_reference_grads(x, Wh, t, (tx, tW), 0.1, rows=rows)
    for dt in ("float32", "bfloat16", "float16"):
        with autocast(dev, dt):
            grads = torch.autograd.grad(lm_loss(x, Wh, t, chunk), (x, Wh))
            grads_kd = torch.autograd.grad(
                lm_loss(x, Wh, t, chunk, teacher=(tx, tW), lam_kd=0.1)[0], (x, Wh)
            )
        out[f"lm_loss {dt}: grad x, grad W vs float64 full logits (rel. diff)"] = [
            rel(a, b) for a, b in zip(grads, ref)
        ]
        out[f"lm_loss KD {dt}: grad x, grad W (rel. diff)"] = [
            rel(a, b) for a, b in zip(grads_kd, ref_kd)
        ]
        del grads, grads_kd
    return out


def check_labels(dev, small):
    """The concept labels of one batch made on the device and on the CPU (same source, SAE, tokens):
    the fraction of label slots that agree, in fp32 and under bf16 autocast (the source pass in
    bf16)."""
    args = parse(["--tiny"] if small else [])
    X, Y = batch(args, "cpu")
    cpu = bench_labeler(args, "cpu")
    gpu = bench_labeler(args, dev)
    out = {}
    for dt in ("float32", "bfloat16"):
        with autocast("cpu", dt):
            a = cpu(X, Y)
        with autocast(dev, dt):
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
    """The compiled CoCoMix student (student_loss: objective.training_loss, train.py's loss;
    the NTP student's graph is a part of it) against eager, fp32 without TF32: loss and the largest
    relative difference over the parameter gradients."""
    args = parse(["--tiny"] if small else ["--batch_size=8"])
    X, Y = batch(args, dev)
    labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr), device=dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = student(args, "cocomix", dev)
    res = []
    compiled = torch.compile(student_loss, backend="aot_eager" if small else "inductor")
    for fn in (student_loss, compiled):
        loss = fn(model, X, Y, labels)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        res.append((loss.item(), grads))
    torch.backends.cuda.matmul.allow_tf32 = True
    return {
        "compiled cocomix: loss eager, loss compiled, max grad rel. diff": [
            res[0][0],
            res[1][0],
            max(rel(a, b).item() for a, b in zip(res[1][1], res[0][1])),
        ]
    }


if __name__ == "__main__":  # parts 2-5 alone, e.g. to rerun one finding on the device
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dry_run", action="store_true", help="smoke-test sizes (the CPU if no GPU)")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for part in (check_ops, check_labels, check_compiled):
        print(json.dumps(part(dev, a.dry_run), default=float, indent=1), flush=True)
    print(json.dumps(check_topk_order(dev), indent=1))
