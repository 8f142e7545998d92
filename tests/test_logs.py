"""What a run leaves in a log file: plain progress lines when the output is not a terminal
(cocomix/progress.py) and, with wandb_log, the same records in an offline W&B run
(cocomix/tracking.py)."""

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from cocomix.progress import progress_bar
from tests.fixtures import ENV, ROOT, TINY, read_log, run


def test_piped_training_prints_plain_lines_with_step_loss_and_lr(data_dir, tmp_path):
    """train.py with its progress on and its output a pipe: no '\\r' anywhere, and a line every
    log_interval steps carrying the step, the loss and the learning rate (the log's own values)."""
    out = str(tmp_path / "run")
    p = run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        "--max_iters=6",
        "--eval_interval=6",
        *TINY,
        "--progress=True",
        "--log_interval=2",
    )
    assert "\r" not in p.stdout + p.stderr
    lines = re.findall(r"^step (\d+)/6 \(\d+%\): loss=([\d.]+), lr=([\d.e+-]+) \[", p.stdout, re.M)
    logged = {r["train_step"]: r for r in read_log(out) if "train_step" in r}
    assert [int(s) for s, _, _ in lines] == [2, 4, 6], p.stdout
    for s, loss, lr in lines:
        assert float(loss) == pytest.approx(logged[int(s)]["loss"], abs=1e-4)
        assert float(lr) == pytest.approx(logged[int(s)]["lr"], rel=1e-2)


def test_progress_lines_every_n_updates_and_a_final_line():
    """Off a terminal: a line every `every` updates, one at the end for the rest, none at all when
    disabled, and none for a transient bar (leave=False) that finished before its first line."""
    f = io.StringIO()
    for _ in progress_bar(range(25), desc="windows", file=f, every=10):
        pass
    assert [line.split(" [")[0] for line in f.getvalue().splitlines()] == [
        "windows 10/25 (40%)",
        "windows 20/25 (80%)",
        "windows 25/25 (100%)",
    ]
    assert f.getvalue().splitlines()[-1].endswith(", done]")
    for kw in ({"disable": True}, {"leave": False}):
        f = io.StringIO()
        with progress_bar(total=5, file=f, **kw) as bar:
            bar.update(5)
        assert f.getvalue() == ""


def wandb_records(path):
    """The records of a .wandb file (LevelDB's log format: 32 KiB blocks of chunks, each with a
    7-byte header of CRC, length and type; a 7-byte file header first) as wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk, records = open(path, "rb").read(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or a record's last chunk
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    return records


def wandb_run(out):
    """(run id, run name, project, history rows by step) of the offline run(s) in out/wandb."""
    rows, runs = {}, set()
    for path in sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))):
        for r in wandb_records(path):
            if r.WhichOneof("record_type") == "run":
                runs.add((r.run.run_id, r.run.display_name, r.run.project))
            elif r.WhichOneof("record_type") == "history":
                row = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                rows.setdefault(row["_step"], {}).update(row)
    (run_id, name, project), *others = sorted(runs)
    assert not others, runs
    return run_id, name, project, rows


def test_wandb_offline_run_holds_every_record_and_a_resume_continues_it(data_dir, tmp_path):
    """Two steps with wandb_log=True and WANDB_MODE=offline: the run's file holds every record of
    log.jsonl at its step (training loss and lr, the evaluation's losses); a resume for two more
    steps logs into the same run (one run id, steps 0-4)."""
    pytest.importorskip("wandb")
    out = str(tmp_path / "run")
    env = dict(ENV, WANDB_MODE="offline", WANDB_SILENT="true")
    env.update({k: str(tmp_path / "wandb-home") for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")})
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2", *TINY]
    wandb_flags = ["--wandb_log=True", "--wandb_project=tiny", "--wandb_run_name=ntp_s1"]
    for extra in (["--max_iters=2"], ["--max_iters=4", "--init_from=resume"]):
        p = subprocess.run(
            [sys.executable, "train.py", *common, *wandb_flags, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
    run_id, name, project, rows = wandb_run(out)
    assert (name, project) == ("ntp_s1", "tiny")
    assert open(os.path.join(out, "wandb_id")).read().strip() == run_id
    assert sorted(rows) == [0, 1, 2, 3, 4]
    for r in read_log(out):  # the lr of a step is its training record's (cocomix/tracking.py)
        step = r.get("iter", r.get("train_step"))
        for k, v in r.items():
            if k not in ("iter", "train_step") and not (k == "lr" and "iter" in r):
                assert rows[step][k] == pytest.approx(v), (step, k)
    assert rows[2]["lr"] == pytest.approx(
        next(r["lr"] for r in read_log(out) if r.get("train_step") == 2)
    )


def test_wandb_log_without_wandb_is_a_one_line_error(data_dir, tmp_path):
    """wandb_log=True where wandb is not installed (hidden from the import system here): one line
    saying how to install it, before any work."""
    hide = "import sys, runpy; sys.modules['wandb'] = None; sys.argv[0] = 'train.py'; "
    p = run(
        "-c",
        hide + "runpy.run_path('train.py', run_name='__main__')",
        f"--data_dir={data_dir}",
        f"--out_dir={tmp_path / 'run'}",
        "--wandb_log=True",
        *TINY,
        check=False,
    )
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "error: wandb_log=True needs wandb, which is not installed: pip install wandb"
    )
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")
