"""
Training throughput of one student config: tokens/s, MFU and peak memory, for each precision asked,
measured in alternation (A, B, A, B, ...) and reported as medians, because machines are noisy.

    python bench.py --n_layer=4 --n_embd=256 --n_head=4 --block_size=256 --batch_size=8 --dtypes=float32,bfloat16
    python bench.py --compare --n_concepts=4096   # NTP vs CoCoMix student (random labels) at the same config

CoCoMix steps here use random concept labels: they time the student only. The concept source's
cost is timed separately (`--source`), as is everything else that a real run adds.
"""

import argparse
import statistics
import time

import torch

from model import GPT, GPTConfig, sparse_mix


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8, n_concepts=0,
                     concept_topk=32, insert_layer=1, steps=5, warmup=2, rounds=3, k_attr=4).items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--mix", default="interleave")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compare", action="store_true", help="NTP vs CoCoMix at the same student config")
    p.add_argument("--mixing", action="store_true", help="sparse top-k mixing vs the dense masked product, fwd+bwd")
    p.add_argument("--tokens", type=int, default=4096, help="tokens for --mixing")
    return p.parse_args()


def make_step(model, args, dtype, device):
    """One optimizer step on a fixed random batch; returns a callable."""
    device_type = "cuda" if "cuda" in device else "cpu"
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    net = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.block_size), generator=g).to(device)
    labels = None
    if model.config.n_concepts:
        labels = torch.randint(0, model.config.n_concepts, (args.batch_size, args.block_size, args.k_attr), generator=g).to(device)
    ptdtype = getattr(torch, dtype)
    ctx = torch.autocast(device_type, dtype=ptdtype, enabled=dtype != "float32")

    def step():
        with ctx:
            _, loss = net(x, x, concept_labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
    return step


def bench_mixing(args):
    """Sparse mixing (gather K rows of W_cmp, scatter-add back) against the released code's dense
    tokens x C masked matrix times W_cmp, forward + backward, alternating, medians."""
    C, K, d, N = args.n_concepts or 32768, args.concept_topk, args.n_embd, args.tokens
    z = torch.randn(N, C, device=args.device)
    values, indices = z.topk(K, dim=-1)
    values.requires_grad_(True)
    W = torch.randn(C, d, device=args.device, requires_grad=True)
    g = torch.randn(N, d, device=args.device)

    def sparse():
        torch.autograd.grad(sparse_mix(values, indices, W), (values, W), g)

    def dense():
        masked = torch.zeros(N, C, device=args.device).scatter(1, indices, values)
        torch.autograd.grad(masked @ W, (values, W), g)
    times = {"sparse": [], "dense": []}
    for fn in (sparse, dense):
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("sparse", sparse), ("dense", dense)):
            t0 = time.perf_counter()
            fn()
            if "cuda" in args.device:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    s, dn = statistics.median(times["sparse"]), statistics.median(times["dense"])
    print(f"mixing fwd+bwd, C={C} K={K} d={d} tokens={N} on {args.device}: sparse {s * 1e3:.1f} ms, "
          f"dense {dn * 1e3:.1f} ms, speed-up {dn / s:.1f}x (medians of {args.rounds})")


def main():
    args = parse()
    if args.mixing:
        return bench_mixing(args)
    torch.manual_seed(0)
    base = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    variants = {}
    for dtype in args.dtypes.split(","):
        if args.compare or not args.n_concepts:
            variants[f"ntp/{dtype}"] = (GPTConfig(**base), dtype)
        if args.compare or args.n_concepts:
            cfg = GPTConfig(**base, n_concepts=args.n_concepts or 4096, concept_topk=args.concept_topk,
                            insert_layer=args.insert_layer, mix=args.mix)
            variants[f"cocomix/{dtype}"] = (cfg, dtype)
    steps, models = {}, {}
    for name, (cfg, dtype) in variants.items():
        models[name] = GPT(cfg).to(args.device)
        steps[name] = make_step(models[name], args, dtype, args.device)
        for _ in range(args.warmup):
            steps[name]()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):  # alternate the variants so machine noise hits them alike
        for name in variants:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    tokens = args.batch_size * args.block_size
    print(f"device={args.device} tokens/step={tokens} steps={args.steps}x{args.rounds} (median step time)")
    print(f"{'variant':<20} {'params':>9} {'step ms':>9} {'tok/s':>9} {'GFLOP/tok':>10} {'TFLOP/s':>8} {'MFU':>6}")
    med = {}
    for name in variants:
        m = models[name]
        med[name] = statistics.median(times[name])
        fpt = m.flops_per_token(args.block_size)
        mfu = m.estimate_mfu(tokens, args.block_size, med[name], args.device)
        print(f"{name:<20} {m.get_num_params() / 1e6:>8.2f}M {med[name] * 1e3:>9.1f} {tokens / med[name]:>9.0f} "
              f"{fpt / 1e9:>10.3f} {fpt * tokens / med[name] / 1e12:>8.3f} {mfu:>6.1%}")
    if args.compare:
        for dtype in args.dtypes.split(","):
            a, b = f"ntp/{dtype}", f"cocomix/{dtype}"
            ratio_t = med[b] / med[a]
            ratio_f = models[b].flops_per_token(args.block_size) / models[a].flops_per_token(args.block_size)
            print(f"{dtype}: cocomix/ntp step time {ratio_t:.2f}x, FLOPs {ratio_f:.2f}x, "
                  f"time ratio / FLOP ratio {ratio_t / ratio_f:.2f}")


if __name__ == "__main__":
    main()
