"""
How CoCoMix's gap to NTP moves with the token budget: the interleaved and added students' val loss
minus the parameter-matched NTP student's (same seed, same batches), against the tokens each student
saw, for each concept source. A Markdown table, and a plot with a log x axis:

    python -m scripts.budget_trend docs/budget_trend.csv --out docs/budget_trend.png

The CSV has one row per source, method, budget and seed (source,method,steps,seed,delta,where).
The rows of a finished `reproduce.py` run, to add to it:

    python -m scripts.budget_trend docs/budget_trend.csv --runs OUT --source strong --steps 2304

(`--runs` reads OUT/runs/*_s{seed}/eval.json: each method's val loss minus ntp_s{seed}'s.)
"""

import argparse
import csv
import glob
import json
import os
import re
import statistics
import sys

FIELDS = ("source", "method", "steps", "seed", "delta", "where")
# reproduce.py's run folders -> the method's name here
METHODS = {"cocomix": "interleave", "cocomix_mix_add": "add"}


def read_rows(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(FIELDS):
        raise SystemExit(f"error: {path}: expected the columns {','.join(FIELDS)}")
    for r in rows:
        r["steps"], r["delta"] = int(r["steps"]), float(r["delta"])
    return rows


def rows_from_runs(out_dir, source, steps, where):
    """Δ val loss vs NTP of every method and seed in a reproduce.py out_dir, from its eval.json."""
    val = {}
    for f in glob.glob(os.path.join(out_dir, "runs", "*_s*", "eval.json")):
        name, seed = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(os.path.dirname(f))).groups()
        with open(f) as fh:
            val[name, seed] = json.load(fh)["result"]["val"]["loss"]
    rows = []
    for (name, seed), loss in sorted(val.items()):
        if name != "ntp" and ("ntp", seed) in val:
            delta = round(loss - val["ntp", seed], 4)
            rows.append(
                dict(zip(FIELDS, (source, METHODS.get(name, name), steps, seed, delta, where)))
            )
    if not rows:
        raise SystemExit(f"error: --runs {out_dir}: no finished run with an NTP run of its seed")
    return rows


def table(rows, tokens_per_step):
    """One line per source, method and budget: the per-seed differences and their mean."""
    groups = {}
    for r in rows:
        groups.setdefault((r["source"], r["method"], r["steps"]), []).append(r)
    lines = [
        "| concept source | method | steps | tokens per "
        "student | Δ val loss vs NTP, by seed | mean |",
        "|---|---|---|---|---|---|",
    ]
    for (source, method, steps), rs in sorted(groups.items()):
        seeds = ", ".join(f"{r['delta']:+.3f} (s{r['seed']})" for r in rs)
        mean = statistics.mean(r["delta"] for r in rs)
        tokens = f"{steps * tokens_per_step / 1e6:.2f}M"
        lines.append(f"| {source} | {method} | {steps} | {tokens} | {seeds} | {mean:+.3f} |")
    return "\n".join(lines)


def plot(rows, path, tokens_per_step):
    """Every seed as a point and each budget's mean joined by a line, per source and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(0, color="k", lw=1)
    styles = {"weak": ("o", "--"), "strong": ("s", "-")}
    methods = sorted({r["method"] for r in rows})
    for source, method in sorted({(r["source"], r["method"]) for r in rows}):
        color, (marker, line) = f"C{methods.index(method)}", styles.get(source, ("^", ":"))
        rs = [r for r in rows if (r["source"], r["method"]) == (source, method)]
        x = [r["steps"] * tokens_per_step for r in rs]
        ax.scatter(x, [r["delta"] for r in rs], color=color, marker=marker, alpha=0.5)
        budgets = sorted({r["steps"] for r in rs})
        means = [statistics.mean(r["delta"] for r in rs if r["steps"] == b) for b in budgets]
        x = [b * tokens_per_step for b in budgets]
        ax.plot(x, means, color=color, ls=line, marker=marker, label=f"{method}, {source} source")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per student")
    ax.set_ylabel("val loss − NTP (same seed; < 0: better than NTP)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("csv", help="the recorded differences (docs/budget_trend.csv)")
    p.add_argument("--out", help="write the plot here (needs matplotlib)")
    p.add_argument("--tokens_per_step", type=int, default=4096, help="the cpu preset's 16 x 256")
    p.add_argument("--runs", help="a reproduce.py out_dir: print its rows for the CSV instead")
    p.add_argument("--source", default="strong", help="with --runs: the concept source's name")
    p.add_argument("--steps", type=int, help="with --runs: the students' max_iters")
    a = p.parse_args(argv)
    if a.runs:
        if not a.steps:
            raise SystemExit("error: --runs needs --steps (the students' max_iters)")
        w = csv.DictWriter(sys.stdout, FIELDS, lineterminator="\n")
        w.writerows(rows_from_runs(a.runs, a.source, a.steps, f"reproduce.py --out_dir={a.runs}"))
        return
    rows = read_rows(a.csv)
    print(table(rows, a.tokens_per_step))
    if a.out:
        plot(rows, a.out, a.tokens_per_step)
        print(f"plot: {a.out}")


if __name__ == "__main__":
    main()
