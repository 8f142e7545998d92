"""The attack suite, round three (the first two are in test_faults.py): a resume that must apply what
it says it applied, stages that must not trust a swapped file nor delete a live run's files, and
one-line errors, quiet Ctrl-C and clean full-disk failures in every entry point. Each case runs the
scripts as subprocesses on tiny models, or calls the checks directly where that says the same."""

import os
import shutil
import signal
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from tests.fixtures import ENV, ROOT, TINY
from tests.test_faults import hooked, one_line_error, spawn

STEPS = 4


def train(data_dir, out, *extra, check=True, hook=None, preexec_fn=None):
    args = [
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        f"--max_iters={STEPS}",
        "--eval_interval=2",
        *TINY,
        *extra,
    ]
    argv = hooked("train.py", hook, *args) if hook else [sys.executable, "train.py", *args]
    if preexec_fn is None:
        return spawn(argv, check=check)
    p = subprocess.run(
        argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn
    )
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A tiny NTP run of STEPS steps; tests copy its folder before resuming it."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    train(data_dir, out)
    return out


def copy_run(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished, out)
    return out


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


# -----------------------------------------------------------------------------
# S1, S6: what a resume says it applies, it applies; what it cannot do, it refuses


def test_resume_applies_its_optimizer_settings(data_dir, finished, tmp_path):
    """--beta1, --beta2 and --weight_decay changed on resume reach the optimizer's param groups (they
    used to be overwritten by the checkpoint's, though the warning and the config said otherwise)."""
    out = copy_run(finished, tmp_path)
    old = ckpt(out)["optimizer"]["param_groups"]
    assert old[0]["betas"] == (0.9, 0.95) and old[0]["weight_decay"] == 0.1
    p = train(
        data_dir,
        out,
        "--init_from=resume",
        f"--max_iters={STEPS + 2}",
        "--beta1=0.8",
        "--beta2=0.5",
        "--weight_decay=0.5",
    )
    assert "warning: resuming" in p.stderr and "beta2=0.5" in p.stderr
    groups = ckpt(out)["optimizer"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.8, 0.5), (0.8, 0.5)]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # the no-decay group stays at 0


def test_resume_below_the_checkpoints_step_is_refused(data_dir, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    p = train(data_dir, out, "--init_from=resume", "--max_iters=1", check=False)
    one_line_error(p, f"max_iters=1 is below the step of {out}/ckpt.pt ({STEPS})")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "--warmup_iters=-5",
            "warmup_iters must be >= 0 (or -1: the default), got warmup_iters=-5",
        ),
        ("--lr_decay_iters=-5", "lr_decay_iters must be >= 0 (or -1"),
        ("--n_head=0", "n_layer, n_head and n_embd must be positive"),
        ("--n_embd=30", "n_embd divisible by n_head"),
        ("--seed=-1", "seed must be in [0, 2**63), got -1"),
        (f"--seed={2**70}", "seed must be in [0, 2**63)"),
    ],
)
def test_settings_that_crashed_or_meant_the_default(arg, message):
    from tests.test_faults import test_settings_checks

    test_settings_checks(arg, message)


def test_resume_with_another_sae_path_names_the_setting():
    """A resume whose --sae_path differs from the run's says so; it used to say 'other files at the
    same paths'."""
    from cocomix.checks import check_resume

    config = {"max_iters": 10, "sae_path": "b/sae.pt", "mode": "cocomix"}
    checkpoint = {
        **{k: 0 for k in ("model", "optimizer", "scaler", "best_val_loss", "rng")},
        "iter_num": 2,
        "model_args": {},
        "config": dict(config, sae_path="a/sae.pt"),
        "inputs": {"sae_path": "1" * 64},
    }
    problem = check_resume(checkpoint, {}, config, "ckpt.pt", {"sae_path": "2" * 64})
    assert "sae_path='b/sae.pt' (checkpoint: 'a/sae.pt')" in problem, problem


def test_kill_during_the_final_evaluation_keeps_the_last_steps(data_dir, tmp_path):
    """kill -9 while the final evaluation runs: ckpt.pt already holds the last step (it was written
    after the evaluation, so the steps since the last checkpoint were lost)."""
    out = str(tmp_path / "run")
    hook = f"""
import math, os, signal, torch
_clip, _exp, _steps = torch.nn.utils.clip_grad_norm_, math.exp, [0]
def _count(*a, **k):
    _steps[0] += 1
    return _clip(*a, **k)
def _exp_hook(x):
    if _steps[0] == {STEPS + 1}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _exp(x)
torch.nn.utils.clip_grad_norm_, math.exp = _count, _exp_hook"""
    p = train(
        data_dir, out, f"--max_iters={STEPS + 1}", "--eval_interval=100", hook=hook, check=False
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert ckpt(out)["iter_num"] == STEPS + 1


# -----------------------------------------------------------------------------
# L1: nothing in a folder is removed before its lock is held


def test_reproduce_stage_leaves_a_live_runs_files_alone(tmp_path, capsys):
    """A user's train.py holds runs/ntp_s1 when reproduce.py reaches that stage: the stage is
    refused, and the run's ckpt.pt and log.jsonl are still there (they were removed first)."""
    import reproduce

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt.pt").write_bytes(b"live checkpoint")
    (folder / "log.jsonl").write_text('{"iter": 0}\n')
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cocomix.runtime import hold_lock; hold_lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(folder / "lock"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit):
            reproduce.command_stage(
                "train ntp seed 1",
                str(folder),
                {"lr": 1},
                [str(folder / "ckpt.pt")],
                [["-c", "pass"]],
                Namespace(force=False),
                dict(os.environ),
                "train.log",
            )
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by another run (PID {holder.pid}" in capsys.readouterr().err
    assert (folder / "ckpt.pt").read_bytes() == b"live checkpoint"
    assert (folder / "log.jsonl").read_text() == '{"iter": 0}\n'
