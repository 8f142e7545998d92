"""reproduce.py end to end on the tiny preset (~2 minutes on a 2-core CPU), plus its small
helpers."""

import csv
import json
import math
import os
import random
import subprocess
import sys
import time
from unittest import mock

import pytest

from cocomix.report import paired_t, report, stats, tokens_to_reach

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIKTOKEN_DIR = os.path.join(REPO, "..", "shared", "tiktoken")
# as .ci/run
DATA_ROOT = os.environ.get(
    "COCOMIX_DATA", os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
)


def run(*args, timeout=600, **env_over):
    env = dict(os.environ, **env_over)
    if os.path.isdir(TIKTOKEN_DIR):
        env.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_DIR))
    env.setdefault("COCOMIX_DATA", DATA_ROOT)
    return subprocess.run(
        [sys.executable, "reproduce.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(path):
    """First Markdown table of results.md: {method: [cells]}."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.startswith("| ") and not line.startswith("| method"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                rows.setdefault(cells[0], cells)
            elif rows:
                break
    return rows


def number(cell):
    return float(cell.split(" ± ")[0].rstrip("M%").replace(",", ""))


def test_tiny_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = ["--preset=tiny", f"--out_dir={out}"]
    if not os.path.exists(os.path.join(DATA_ROOT, "tinyshakespeare", "input.txt")):
        # no shared data: a data folder of our own, where any English-ish text will do for a smoke
        # test
        words = (
            "the king and queen of a far land went to see the old man by the sea who said".split()
        )
        rng = random.Random(0)
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(4000))
        (tmp_path / "data" / "tinyshakespeare").mkdir(parents=True)
        (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_text(text)
        args.append(f"--data_root={tmp_path / 'data'}")
    t0 = time.time()
    r = run(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"tiny preset: {time.time() - t0:.0f}s")

    root = tmp_path / "data" if "--data_root" in args[-1] else os.path.abspath(DATA_ROOT)
    inputs = json.loads((out / "data" / "stage.json").read_text())["settings"]["inputs"]
    # from the data folder
    assert inputs == [[os.path.join(root, "tinyshakespeare", "input.txt"), mock.ANY]], inputs

    from reproduce import PRESETS

    rows = table_rows(out / "results.md")
    header = [
        "method",
        "params",
        "tokens",
        "val loss",
        "val ppl",
        "val bpb",
        "OOD loss",
        "LAMBADA acc",
        "LAMBADA ppl",
        "wall (s)",
        "tokens/s",
    ]
    for m in ("ntp", "cocomix", "kd", "pause"):
        assert m in rows, f"no row for {m} in results.md"
        cells = dict(zip(header, rows[m]))
        for key in ("params", "tokens", "val loss", "val ppl", "val bpb", "wall (s)", "tokens/s"):
            assert math.isfinite(number(cells[key])), (m, key, cells[key])
        # '–' only where the preset's file is missing
        for key in (
            "OOD loss",
            "LAMBADA acc",
            "LAMBADA ppl",
        ):
            there = os.path.isfile(
                os.path.join(root, PRESETS["tiny"]["ood" if key == "OOD loss" else "lambada"])
            )
            if there:  # a '–' would be an evaluation silently dropped
                assert math.isfinite(number(cells[key])), (m, key, cells[key])
            else:
                assert cells[key] == "–", (m, key, cells[key])
        assert 0 < number(cells["val loss"]) < 12
    # every method saw the same token budget
    assert len({rows[m][2] for m in ("ntp", "cocomix", "kd", "pause")}) == 1
    text = (out / "results.md").read_text()
    assert (
        "Paired differences to NTP" in text
        and "Sample efficiency" in text
        and "CoCoMix vs pause" in text
    )
    # the same table on screen (main table and paired differences), then the file's path
    shown = text[text.index("| method | params") : text.index("**Sample efficiency**")]
    shown += text[text.index("**Sample efficiency**") :].split("\n")[0]
    assert shown in r.stdout and all(
        f"| {m} | " in shown for m in ("ntp", "cocomix", "kd", "pause")
    )
    assert r.stdout.rstrip().endswith(f"results: {out / 'results.md'}"), r.stdout[-500:]

    try:
        import matplotlib  # noqa: F401 (requirements-test.txt installs it)

        assert (
            out / "curves.png"
        ).stat().st_size > 10_000 and "![val loss vs tokens](curves.png)" in text
    except ImportError:
        assert "matplotlib is not installed" in text
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert {c["method"] for c in curves} == {"ntp", "cocomix", "kd", "pause"}
    assert all(math.isfinite(float(c["val_loss"])) for c in curves)

    # everything is done: a second run skips every stage and only re-reads the records
    t0 = time.time()
    r = run(*args, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== stage" not in r.stdout, r.stdout
    # data, source, sae, 4 trains, 4 evals; the report is rewritten
    assert r.stdout.count("skip ") >= 2 + 1 + 4 + 4
    assert time.time() - t0 < 60

    # other settings in the same out_dir: a one-line error, nothing overwritten
    other = tmp_path / "other.txt"
    other.write_text("a different corpus entirely. " * 2000)
    r = run(f"--out_dir={out}", "--preset=tiny", f"--input={other}", timeout=120)
    assert r.returncode != 0 and "use another --out_dir" in r.stderr, r.stderr

    # --set changes every method's student settings: the finished runs had 40 steps, so the same
    # out_dir refuses
    r = run(*args, "--set", "max_iters=20", "learning_rate=1e-3", timeout=120)
    assert (
        r.returncode != 0
        and "train.learning_rate, train.max_iters" in r.stderr
        and "train ntp seed 1" in r.stderr
    ), r.stderr
    r = run(*args, "--set", "max_iters", timeout=120)
    assert r.returncode != 0 and "--set 'max_iters': expected KEY=VALUE" in r.stderr, r.stderr
    # a key train.py does not have is refused before any stage, with the nearest keys
    for flag, spec, message in (
        (
            "--set",
            "max_iter=20",
            "--set: train.py has no config key 'max_iter'; did you mean max_iters",
        ),
        (
            "--ablation",
            "mix=add,lamm=0",
            "--ablation: train.py has no config key 'lamm'; did you mean lam",
        ),
    ):
        fresh = tmp_path / "fresh"
        r = run(f"--out_dir={fresh}", "--preset=tiny", flag, spec, timeout=120)
        assert r.returncode != 0 and message in r.stderr and not fresh.exists(), r.stderr

    # a given concept source and SAE in place of the source and sae stages, recorded by their
    # SHA-256
    import shutil

    import torch

    from cocomix.weights import file_sha256

    given, out2 = tmp_path / "given", tmp_path / "out2"
    given.mkdir()
    shutil.copy(out / "source" / "ckpt.pt", given / "source.pt")
    shutil.copy(out / "sae" / "sae.pt", given / "sae.pt")
    args2 = [a for a in args if not a.startswith("--out_dir")] + [
        f"--out_dir={out2}",
        "--methods=cocomix",
        f"--concept_source={given / 'source.pt'}",
        f"--sae_path={given / 'sae.pt'}",
    ]
    r = run(*args2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skip source: given" in r.stdout and "skip sae: given" in r.stdout
    assert not (out2 / "source").exists() and not (out2 / "sae").exists()
    deps = json.loads((out2 / "runs" / "cocomix_s1" / "stage.json").read_text())["settings"]["deps"]
    assert deps["source"] == {
        "path": str(given / "source.pt"),
        "sha256": file_sha256(str(given / "source.pt")),
    }
    assert deps["sae"] == {
        "path": str(given / "sae.pt"),
        "sha256": file_sha256(str(given / "sae.pt")),
    }
    assert "cocomix" in table_rows(out2 / "results.md")
    # another file under the same name: the SAE (same host) -> the finished run refuses, naming what
    # changed
    obj = torch.load(given / "sae.pt", weights_only=False)
    obj["meta"]["note"] = "resaved"
    torch.save(obj, given / "sae.pt")
    r = run(*args2, timeout=120)
    assert (
        r.returncode == 1 and "deps.sae.sha256" in r.stderr and "use another --out_dir" in r.stderr
    ), r.stderr
    # the source: its SAE no longer belongs to it
    obj = torch.load(given / "source.pt", weights_only=False)
    obj["note"] = "resaved"
    torch.save(obj, given / "source.pt")
    r = run(*args2, timeout=120)
    assert (
        r.returncode == 1
        and "--sae_path: SAE" in r.stderr
        and "pass the concept source it was trained on" in r.stderr
    )
    r = run(*[a for a in args2 if not a.startswith("--concept_source")], timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: --sae_path needs --concept_source: an SAE belongs to the model it was trained on"
    ), r.stderr


def test_data_folder_errors(tmp_path):
    """Without a data folder the cpu preset (gutenberg) stops at once, with one line naming the ways
    to give one; a --data_root that is not a folder is refused, a COCOMIX_DATA that is not one
    counts as none."""
    out, nowhere = tmp_path / "out", tmp_path / "nowhere"
    msg = (
        "error: preset cpu reads gutenberg from the data folder: give --data_root DIR or set "
        "COCOMIX_DATA to a folder holding it, or give --input FILES"
    )
    r = run("--preset=cpu", f"--out_dir={out}", "--data_root=", timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == msg, r.stderr
    r = run("--preset=cpu", f"--out_dir={out}", timeout=120, COCOMIX_DATA=str(nowhere))
    assert (
        r.returncode == 1
        and r.stderr.strip() == msg
        and f"COCOMIX_DATA={nowhere} is not a folder" in r.stdout
    )
    r = run("--preset=tiny", f"--out_dir={out}", f"--data_root={nowhere}", timeout=120)
    assert (
        r.returncode == 1 and r.stderr.strip() == f"error: --data_root {nowhere}: not a folder"
    ), r.stderr
    (tmp_path / "data").mkdir()
    r = run("--preset=cpu", f"--out_dir={out}", f"--data_root={tmp_path / 'data'}", timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: input not found: {tmp_path / 'data' / 'gutenberg'}; "
        "pass --input FILES or another --data_root"
    ), r.stderr
    assert not out.exists()
    r = run("--preset=tiny", f"--out_dir={out}", "--seeds=1,2,1", timeout=120)
    assert r.returncode == 1 and "given twice" in r.stderr and not out.exists(), r.stderr


def test_checkpoint_step_reads_ablation_values_as_numbers(tmp_path):
    """--ablation max_iters=100 keeps '100' as written in its record; the finished stage must still
    count as finished (it used to compare 100 != '100' and stop), and its tokens as a number."""
    import torch

    from reproduce import checkpoint_step

    torch.save({"iter_num": 100}, tmp_path / "ckpt.pt")
    cfg = {"max_iters": "100", "batch_size": "4", "block_size": 64}
    assert checkpoint_step("train", str(tmp_path), cfg) == {"iter_num": 100, "tokens": 100 * 4 * 64}


def test_stats_and_tokens_to_reach():
    assert stats([1.0]) == "1.000"
    assert stats([1.0, 3.0], 1) == "2.0 ± 1.4"
    assert stats([None]) == "–"
    curve = [(0, 10.0), (100, 8.0), (200, 6.0), (300, 5.0)]
    assert tokens_to_reach(curve, 7.0) == pytest.approx(150)
    assert tokens_to_reach(curve, 5.0) == pytest.approx(300)
    assert tokens_to_reach(curve, 4.0) is None


def test_paired_t_against_closed_forms():
    """The t-test's p against Student's t in closed form (1 and 2 degrees of freedom) and a table
    value."""
    for t in (0.0, 0.3, 2.0, 12.7, 40.0):  # two seeds t +- 1: mean t, std sqrt(2), t statistic t
        assert paired_t([t - 1, t + 1]) == pytest.approx(
            (t, 1 - 2 / math.pi * math.atan(t)), rel=1e-6
        )
        t3, p = paired_t([t - 1, t, t + 1])  # std 1: t statistic t * sqrt(3)
        assert p == pytest.approx(1 - t3 / math.sqrt(2 + t3**2), rel=1e-6, abs=1e-12)
    e = [
        -2,
        -1,
        -0.5,
        0,
        0,
        0,
        0,
        0.5,
        1,
        2,
    ]  # mean 0; shifted so that t = 2.2622, the 97.5% point at 9 df
    m = 2.2622 * math.sqrt(sum(x * x for x in e) / 9) / math.sqrt(10)
    t, p = paired_t([m + x for x in e])
    assert t == pytest.approx(2.2622) and p == pytest.approx(0.05, abs=1e-4)
    assert paired_t([1.0]) is None and paired_t([0.5, 0.5]) is None  # one seed; no spread


def test_report_numbers_from_records(tmp_path, monkeypatch):
    """The report's paired numbers from hand-made records: Δ val loss, wins, the tokens CoCoMix
    needs to reach NTP's final val loss, CoCoMix (and an ablation) vs pause and KD; without
    matplotlib, a note instead of the plot; curves.csv readable with a comma in a method's label;
    the suite's skipped files."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    final = {
        ("ntp", 1): 5.0,
        ("ntp", 2): 5.2,
        ("cocomix", 1): 4.9,
        ("cocomix", 2): 5.3,
        ("pause", 1): 5.1,
        ("pause", 2): 5.5,
        ("kd", 1): 4.95,
        ("kd", 2): 5.25,
        ("cocomix[mix=add,lam=0]", 1): 4.8,
        ("cocomix[mix=add,lam=0]", 2): 5.2,
    }
    runs = {}
    for (m, s), v in final.items():
        # val curves: NTP ends at 5.0 / 5.2; CoCoMix seed 1 passes 5.0 halfway between 300 and 400
        # tokens
        curve = {
            "ntp": [10, 6, 5.5, 5.2 if s == 1 else 5.4, v],
            "cocomix": [10, 6, 5.4, 5.1 if s == 1 else 5.5, v],
            "pause": [10, 7, 6, 5.6, v],
            "kd": [10, 7, 6, 5.6, v],
            "cocomix[mix=add,lam=0]": [10, 7, 6, 5.6, v],
        }[m]
        log = [
            {"iter": i, "tokens": 100 * i, "train/loss": l, "val/loss": l, "time": 1.0}
            for i, l in enumerate(curve)
        ]
        log += [{"train_step": i, "loss": 6.0 + (0.1 if m == "cocomix" else 0.0)} for i in range(4)]
        runs[m, s] = {
            "eval": {"params": 1e6, "val": {"loss": v, "ppl": math.exp(v), "bpb": v / 2}},
            "train": {"wall": 10.0},
            "log": log,
        }
    runs["ntp", 1]["eval"].update(
        suite={"piqa:piqa": {"n": 3, "acc": 0.5}}, suite_skipped=[["notes.md", "not .jsonl"]]
    )
    report(
        str(tmp_path),
        runs,
        ["ntp", "cocomix", "kd", "pause", "cocomix[mix=add,lam=0]"],
        [1, 2],
        ["- a note"],
    )
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert {(c["method"], c["seed"]) for c in curves} == {(m, str(s)) for m, s in runs}
    assert all(len(c) == 8 and float(c["time"]) == 1.0 for c in curves)
    text = (tmp_path / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| cocomix | 0."))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == stats([-0.1, 0.1], 4) and cells[2] == "+0.0 (p = 1)"  # mean 0: t = 0
    assert cells[3] == "0.1000 ± 0.0000" and cells[4] == "1/2 (-0.100, +0.100)"
    assert cells[5] == "350 (1/2 seeds)" and cells[6] == "12.5%"  # 1 - 350 / 400
    assert f"Δ val loss {stats([-0.2, -0.2], 4)}, CoCoMix lower on 2/2 seeds" in text
    assert (
        f"**cocomix vs KD** (same seed, same batches): Δ val loss {stats([-0.05, 0.05], 4)}, t "
        "+0.0 (p = 1), cocomix lower on 1/2 seeds (-0.050, +0.050)." in text
    )
    # mean -0.1, std 0.1 / sqrt(2): t = -2 on 1 degree of freedom, p = 1 - 2 atan(2) / pi = 0.295
    assert (
        "**cocomix[mix=add,lam=0] vs KD** (same seed, same batches): Δ val loss "
        f"{stats([-0.15, -0.05], 4)}, t -2.0 (p = 0.3), "
        "cocomix[mix=add,lam=0] lower on 2/2 seeds (-0.150, -0.050)." in text
    )
    assert "pause vs KD" not in text and "kd vs KD" not in text
    assert (
        "CoCoMix reaches NTP's final val loss with 12.5% fewer tokens (1/2 seeds reach it)" in text
    )
    # seed 2: NTP passes CoCoMix's final 5.3 halfway between 300 and 400 tokens; seed 1: NTP never
    # gets to 4.9
    assert (
        "NTP reaches CoCoMix's final val loss with 12.5% fewer tokens (1/2 seeds reach it)" in text
    )
    assert "matplotlib is not installed" in text and not (tmp_path / "curves.png").exists()
    assert "| piqa:piqa | 3 | 0.5000 |" in text and "Not evaluated: notes.md (not .jsonl)" in text


def test_presets_name_real_flags(monkeypatch):
    """Every preset's settings pass the checks their scripts apply: its config/ files with the keys
    reproduce.py adds, train.py's configurator (known key, the default's type); the SAE flags,
    sae.py's parser. And what a stage records as its settings is what train.py runs with. A misspelt
    key in the `gpu` preset (which CI cannot run: it needs GPT-2 and OpenWebText) would otherwise
    surface only on a GPU."""
    from cocomix.sae_cli import arg_parser
    from reproduce import PRESETS, flags, train_command

    src = open(os.path.join(REPO, "train.py")).read()
    defaults = src[
        src.index("# ---") : src.index("config_keys = ")
    ]  # train.py's settings block: plain literals
    configurator = open(os.path.join(REPO, "configurator.py")).read()
    # the presets name their config files from the repo root, where train.py runs
    monkeypatch.chdir(REPO)
    for name, p in PRESETS.items():
        top = {k: p[k] for k in ("concept_source", "sae_path", "sae_layer", "n_concepts") if k in p}
        # max_iters as --set gives it: a key of the config file that the flags must override
        parts = {
            "source": {"seed": 1337},
            "student": {"max_iters": 7, **top, "mode": "cocomix", "seed": 1},
        }
        assert p.get("source") or top, (
            f"preset {name}: neither a source config nor a given concept source"
        )
        for part, extra in parts.items():
            if part not in p:
                continue
            argv, settings = train_command(p[part], extra, "DATA", "OUT")
            monkeypatch.setattr(sys, "argv", argv)
            env = {}
            exec(defaults, env)
            try:
                exec(configurator, env)
            except SystemExit:
                pytest.fail(f"preset {name}.{part}: train.py rejects {argv} (see stderr)")
            assert {k: env[k] for k in settings} == settings and (
                env["data_dir"],
                env["out_dir"],
            ) == ("DATA", "OUT")
            # the config file's settings are in the record
            assert len(settings) > len(extra) + 5, settings
        if "sae" in p:
            try:
                parser = arg_parser()
                parser.allow_abbrev = (
                    False  # a misspelt prefix (--eval_token) would be taken for the full flag
                )
                parser.parse_args(["--data_dir=x", *flags(p["sae"])])
            except SystemExit:
                pytest.fail(f"preset {name}.sae: sae.py rejects {flags(p['sae'])}")


def test_budget_trend_rows_table_and_plot(tmp_path, capsys):
    """scripts.budget_trend: a reproduce.py out_dir's eval.json files become Δ-vs-NTP rows (method
    minus the NTP run of the same seed; a seed without NTP gives none), the rows round-trip through
    the CSV, and the table averages each budget's seeds."""
    import json

    from scripts import budget_trend

    val = {"ntp_s1": 5.30, "cocomix_s1": 5.37, "cocomix_mix_add_s1": 5.25, "ntp_s2": 5.34}
    val |= {"cocomix_s2": 5.40, "kd_s3": 5.2}
    for name, loss in val.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        result = {"result": {"val": {"loss": loss}}}
        (tmp_path / "runs" / name / "eval.json").write_text(json.dumps(result))
    budget_trend.main([str(tmp_path / "none.csv"), f"--runs={tmp_path}", "--steps=2304"])
    table_csv = tmp_path / "trend.csv"
    table_csv.write_text(",".join(budget_trend.FIELDS) + "\n" + capsys.readouterr().out)
    rows = budget_trend.read_rows(str(table_csv))
    got = {(r["method"], r["seed"]): r["delta"] for r in rows}
    assert got == {("add", "1"): -0.05, ("interleave", "1"): 0.07, ("interleave", "2"): 0.06}
    assert {r["source"] for r in rows} == {"strong"} and {r["steps"] for r in rows} == {2304}
    out = tmp_path / "trend.png"
    budget_trend.main([str(table_csv), f"--out={out}"])
    text = capsys.readouterr().out
    assert "| strong | interleave | 2304 | 9.44M | +0.070 (s1), +0.060 (s2) | +0.065 |" in text
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no finished run"):
        budget_trend.main([str(table_csv), f"--runs={tmp_path / 'empty'}", "--steps=1"])
