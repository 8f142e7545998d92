"""
reproduce.py's last two stages: evaluate a finished run, and write the comparison between methods
(results.md, curves.csv, curves.png) from the runs' records. Kept apart from reproduce.py, which
only decides what to run and when.
"""

import csv
import math
import os


def evaluate_run(model, data_dir, ev, device):
    """The eval stage's numbers for a trained model: val loss (and bpb), the suite, OOD text,
    LAMBADA."""
    import torch

    from cocomix.corpus import load_tokens, token_byte_lengths, tokenizer
    from cocomix.evaluate import evaluate_lambada, evaluate_suite, evaluate_text, evaluate_tokens

    model.eval()
    enc = tokenizer()
    tb = token_byte_lengths(enc)
    T, B = model.config.block_size, ev["batch_size"]
    with torch.no_grad():
        val = evaluate_tokens(
            model, load_tokens(data_dir, "val"), T, B, device, ev["max_tokens"], tb
        )
        out = {"params": model.get_num_params(), "val": val}
        # the paper's zero-shot table: every benchmark file of the folder (scripts/eval.py --suite)
        if ev.get("suite"):
            out["suite"], out["suite_skipped"], out["suite_failed"] = evaluate_suite(
                model, ev["suite"], enc, T, B, device, token_bytes=tb, progress=False
            )
        if ev["ood"]:
            out["ood"] = evaluate_text(model, ev["ood"], enc, T, B, device, ev["max_tokens"], tb)
        if ev["lambada"]:
            out["lambada"] = evaluate_lambada(
                model, ev["lambada"], enc, T, B, device, ev["lambada_max"]
            )
    return out


def stats(xs, digits=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def paired_t(d):
    """Two-sided one-sample t-test of the per-seed differences d against 0: (t, p), or None for
    fewer than two seeds or no spread. p = 2 P(T > |t|) for Student's t with n - 1 degrees of
    freedom, the tail integrated by the midpoint rule (to ~1e-8)."""
    n = len(d)
    sd = math.sqrt(sum((x - sum(d) / n) ** 2 for x in d) / (n - 1)) if n > 1 else 0
    if sd == 0:
        return None
    t, nu = sum(d) / n / (sd / math.sqrt(n)), n - 1
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    density = lambda x: c * (1 + x * x / nu) ** (-(nu + 1) / 2)
    N, a = 20000, abs(t)
    b = max(a, 1.0)  # P(T > a) = P(a < T < b) + P(T > b), the second over u = b / x in (0, 1]
    mid = lambda g, lo, hi: sum(g(lo + (i + 0.5) * (hi - lo) / N) for i in range(N)) * (hi - lo) / N
    tail = mid(density, a, b) + mid(lambda u: density(b / u) * b / u**2, 0.0, 1.0)
    return t, min(1.0, 2 * tail)


def t_test(d):
    r = paired_t([x for x in d if x is not None])
    return "–" if r is None else f"{r[0]:+.1f} (p = {r[1]:.2g})"


def tokens_to_reach(curve, target):
    """Where the val-loss curve [(tokens, loss)] first reaches target, linearly interpolated."""
    for i, (t, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = curve[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
    return None


def report(out_dir, runs, methods, seeds, notes):
    """runs[(method, seed)] = dict(eval=..., train=..., log=[...]) -> results.md, curves.csv,
    curves.png. Returns the results table as in results.md: the main table and the paired
    differences, for the terminal."""
    curves = {
        k: [(r["tokens"], r["val/loss"]) for r in v["log"] if "val/loss" in r]
        for k, v in runs.items()
    }
    train_loss = {
        k: {r["train_step"]: r.get("ntp", r["loss"]) for r in v["log"] if "train_step" in r}
        for k, v in runs.items()
    }
    with open(os.path.join(out_dir, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)  # quotes a label with commas, e.g. cocomix[mix=add,lam=0]
        w.writerow(
            ["method", "seed", "iter", "tokens", "train_loss", "val_loss", "val_bpb", "time"]
        )
        for (m, s), v in runs.items():
            for r in v["log"]:
                if "val/loss" in r:
                    w.writerow(
                        [
                            m,
                            s,
                            r["iter"],
                            r["tokens"],
                            r["train/loss"],
                            r["val/loss"],
                            r.get("val/bpb", ""),
                            f"{r['time']:.1f}",
                        ]
                    )
    get = lambda m, f: [f(runs[m, s]) for s in seeds]
    dval = lambda a, b: [
        runs[a, s]["eval"]["val"]["loss"] - runs[b, s]["eval"]["val"]["loss"] for s in seeds
    ]
    wins = lambda d, unit="": (
        f"{sum(x < 0 for x in d)}/{len(d)}{unit} ({', '.join(f'{x:+.3f}' for x in d)})"
    )
    opt = lambda key, sub: lambda r: r["eval"][key][sub] if key in r["eval"] else None
    lines = [
        "# CoCoMix reproduction: results",
        "",
        *notes,
        "",
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))}. Val: the prepared val split, "
        "up to the evaluation's max_tokens (cocomix/evaluate.py, evaluate_tokens); OOD: loss on "
        "another text; wall: the train.py process, tokens/s = training tokens / wall.",
        "",
    ]
    first = len(lines)  # the table the terminal shows starts here
    lines += [
        "| method | params | tokens | val loss | val ppl | val bpb | OOD loss | LAMBADA acc "
        "| LAMBADA ppl | wall (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        tokens = [
            runs[m, s]["train"].get("tokens", curves[m, s][-1][0]) for s in seeds
        ]  # the checkpoints' budget
        wall = get(m, lambda r: r["train"]["wall"])
        lines.append(
            f"| {m} | {runs[m, seeds[0]]['eval']['params'] / 1e6:.2f}M | {tokens[0]:,} | "
            f"{stats(get(m, opt('val', 'loss')))} | {stats(get(m, opt('val', 'ppl')), 1)} | "
            f"{stats(get(m, opt('val', 'bpb')))} | {stats(get(m, opt('ood', 'loss')))} | "
            f"{stats(get(m, opt('lambada', 'acc')))} | {stats(get(m, opt('lambada', 'ppl')), 1)} | "
            f"{stats(wall, 0)} | {stats([t / w for t, w in zip(tokens, wall)], 0)} |"
        )
    if "ntp" in methods and len(methods) > 1:
        lines += [
            "",
            "## Paired differences to NTP (same seed, same batches)",
            "",
            "Δ val loss: method − NTP on the val split (negative = better). Δ train loss: mean "
            "over the run of the per-step next-token loss difference (train.py's log, every "
            "log_interval steps; the concept/KD terms are not included). t (p): two-sided paired "
            "t-test of Δ val loss over seeds. Tokens to NTP's final val loss: on the eval curves "
            "of train.py's val estimate, linearly "
            "interpolated; 'fewer' = 1 − that / NTP's budget.",
            "",
            "| method | Δ val loss | t (p) | Δ train loss | wins (val): Δ per seed "
            "| tokens to NTP final val loss | fewer tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        efficiency = {}
        for m in methods:
            if m == "ntp":
                continue
            d = dval(m, "ntp")
            dtrain = []
            for s in seeds:
                a, b = train_loss[m, s], train_loss["ntp", s]
                common = sorted(set(a) & set(b))
                dtrain.append(sum(a[i] - b[i] for i in common) / len(common) if common else None)
            reach = []
            for s in seeds:
                target = curves["ntp", s][-1][1]
                t = tokens_to_reach(curves[m, s], target)
                reach.append(None if t is None else (t, 1 - t / curves["ntp", s][-1][0]))
            got = [r for r in reach if r is not None]
            efficiency[m] = (got, len(reach))
            lines.append(
                f"| {m} | {stats(d, 4)} | {t_test(d)} | {stats(dtrain, 4)} | {wins(d)} | "
                f"{stats([r[0] for r in got], 0) if got else 'not reached'} "
                f"({len(got)}/{len(reach)} seeds) | "
                f"{stats([100 * r[1] for r in got], 1) + '%' if got else '–'} |"
            )
        # the same interleaved student, concepts vs a learned vector
        if "cocomix" in methods and "pause" in methods:
            d = dval("cocomix", "pause")
            lines += [
                "",
                "**CoCoMix vs pause** (the same interleaved architecture and width; the slot "
                "holds the predicted concepts instead of one learned vector): Δ val loss "
                f"{stats(d, 4)}, CoCoMix lower on {sum(x < 0 for x in d)}/{len(d)} seeds.",
            ]
        # the paper's other baseline, with the same teacher; the target is to beat both
        if "kd" in methods:
            for m in (m for m in methods if m.startswith("cocomix")):
                d = dval(m, "kd")
                lines += [
                    "",
                    f"**{m} vs KD** (same seed, same batches): Δ val loss {stats(d, 4)}, t "
                    f"{t_test(d)}, {m} lower on {wins(d, ' seeds')}.",
                ]
        if "cocomix" in efficiency:
            got, n = efficiency["cocomix"]
            lines += [
                "",
                "**Sample efficiency** (paper: CoCoMix reaches NTP's final val perplexity with "
                "21.5% fewer tokens at 1.38B/200B tokens): "
                + (
                    "CoCoMix reaches NTP's final val loss with "
                    f"{stats([100 * r[1] for r in got], 1)}% "
                    f"fewer tokens ({len(got)}/{n} seeds reach it)."
                    if got
                    else "CoCoMix never reaches NTP's final val loss within the budget."
                ),
            ]
            # the other way round, which measures how far behind CoCoMix is where it does not reach
            # NTP
            back = [tokens_to_reach(curves["ntp", s], curves["cocomix", s][-1][1]) for s in seeds]
            back = [1 - t / curves["ntp", s][-1][0] for t, s in zip(back, seeds) if t is not None]
            if back:
                lines[-1] += (
                    " NTP reaches CoCoMix's final val loss with "
                    f"{stats([100 * b for b in back], 1)}% fewer "
                    f"tokens ({len(back)}/{n} seeds reach it)."
                )
    table = "\n".join(lines[first:])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paired = "ntp" in methods and len(methods) > 1
        fig, axes = plt.subplots(
            1, 2 if paired else 1, figsize=(13 if paired else 7, 4.5), squeeze=False
        )
        ax = axes[0, 0]
        for i, m in enumerate(methods):
            for j, s in enumerate(seeds):
                t, l = zip(*curves[m, s])
                ax.plot(t, l, color=f"C{i}", alpha=0.8, label=m if j == 0 else None)
        ax.set_xlabel("training tokens"), ax.set_ylabel("val loss (train.py estimate)"), ax.legend()
        # the first evaluation (~ln V for every method) would squash the rest of the curves
        late = [l for c in curves.values() for _, l in c[1:]]
        if late:
            ax.set_ylim(min(late) - 0.05, max(late) + 0.05)
        # method - NTP at each evaluation, seed by seed: the comparison the table's numbers
        # summarise
        if paired:
            ax = axes[0, 1]
            ax.axhline(0, color="C0", lw=1, label="ntp")
            for i, m in enumerate(methods):
                for j, s in enumerate(seeds):
                    if m != "ntp":
                        ntp = dict(curves["ntp", s])
                        t, d = zip(
                            *[(t, l - ntp[t]) for t, l in curves[m, s] if t in ntp and t > 0]
                        )
                        ax.plot(
                            t, d, color=f"C{i}", alpha=0.8, marker=".", label=m if j == 0 else None
                        )
            (
                ax.set_xlabel("training tokens"),
                ax.set_ylabel("val loss − NTP (same seed; < 0: better than NTP)"),
            )
            ax.legend()
        fig.savefig(os.path.join(out_dir, "curves.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)
        lines += ["", "![val loss vs tokens](curves.png)"]
    except ImportError:
        lines += ["", "(matplotlib is not installed: no curves.png; the curves are in curves.csv)"]
    suites = {k: r["eval"]["suite"] for k, r in runs.items() if r["eval"].get("suite")}
    if suites:  # acc for choices, perplexity for LAMBADA and texts: the paper's zero-shot table
        from cocomix.evaluate import markdown_table

        lines += ["", "## Zero-shot suite (scripts/eval.py --suite)"]
        for (m, s), res in suites.items():
            lines += [
                "",
                f"{m}, seed {s}:",
                "",
                markdown_table(
                    res, *(runs[m, s]["eval"].get(f"suite_{k}", ()) for k in ("skipped", "failed"))
                ).rstrip(),
            ]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return table
