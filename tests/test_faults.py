"""The attack suite: what a careful (or hostile) user does to a run, replayed against
the scripts as subprocesses on tiny models. Every case ends in exact continuation, or in a one-line
error with a non-zero exit and nothing half-written; never in a traceback, a crash, or exit 0 with a
wrong or lost result. Run: python -m pytest -q test_faults.py

Signals and kills land at chosen moments through a hook run before the script (`hooked`): it wraps a
function train.py calls once per optimizer step (torch.nn.utils.clip_grad_norm_) or once per
evaluation (math.exp, for the perplexity), so nothing depends on timing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch

from cocomix.weights import save_atomic
from tests.fixtures import ENV, ROOT, TINY, read_log, run, signal_in_final_eval

STEPS = 8
# differ between runs of one computation
TIMES = (
    "time",
    "time_source",
    "time_student",
    "label_hits",
    "label_computed",
)


def hooked(script, hook, *args):
    """argv running `hook` (Python code) first, then `script` as __main__ with args, as `python
    script args`."""
    code = (
        f"import runpy, sys\n{hook}\nsys.argv[0] = {script!r}\nrunpy.run_path({script!r}, "
        "run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]


def per_step(action, on_calls):
    """A hook doing `action` (code) in the optimizer steps numbered on_calls (1-based), before the
    step."""
    return f"""
import os, signal, torch
_clip, _n = torch.nn.utils.clip_grad_norm_, [0]
def _hooked(*a, **k):
    _n[0] += 1
    if _n[0] in {tuple(on_calls)!r}:
        {action}
    return _clip(*a, **k)
torch.nn.utils.clip_grad_norm_ = _hooked"""


def spawn(argv, check=True):
    p = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{argv[-12:]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    return p


def one_line_error(p, fragment):
    """Exit non-zero with exactly one 'error:' line holding fragment, and no traceback."""
    assert p.returncode not in (0, None), (p.returncode, p.stdout[-1000:])
    assert p.returncode > 0, f"killed by signal {-p.returncode}: {p.stderr[-1000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], (fragment, p.stderr[-1500:])


def numbers(log):
    """A log without its wall times: what must be identical between two runs of the same
    computation."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in log]


def same_state(a, b):
    """Two checkpoints hold bitwise the same model, optimizer, step and torch RNG."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["iter_num"] == cb["iter_num"] and ca["best_val_loss"] == cb["best_val_loss"]
    for key, v in ca["model"].items():
        assert torch.equal(v, cb["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, v in sa[i].items():
            assert torch.equal(v, sb[i][key]), (i, key)
    # numpy's and Python's: unseeded, never drawn from
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])


# -----------------------------------------------------------------------------
# shared pieces: the data (test_cocomix's fixture), a concept source, an SAE trained on it by sae.py


@pytest.fixture(scope="module")
def sae_run(source_and_sae, data_dir, tmp_path_factory):
    """(source ckpt, SAE trained by sae.py on its block 1, the sae.py command): the SAE records its
    host's hash."""
    src, _ = source_and_sae
    out = str(tmp_path_factory.mktemp("sae") / "sae.pt")
    cmd = [
        "sae.py",
        f"--concept_source={src}",
        f"--data_dir={data_dir}",
        "--layer=1",
        f"--sae_path={out}",
        "--n_latents=64",
        "--k=4",
        "--tokens=4096",
        "--batch_size=256",
        "--buffer=1024",
        "--eval_tokens=512",
    ]
    run(*cmd)
    return src, out, cmd


def cocomix(data, src, sae, out, *extra):
    return [
        f"--data_dir={data}",
        f"--out_dir={out}",
        "--mode=cocomix",
        f"--concept_source={src}",
        f"--sae_path={sae}",
        "--concept_topk=8",
        f"--max_iters={STEPS}",
        "--eval_interval=2",
        "--dropout=0.1",
        "--always_save_checkpoint=True",
        "--learning_rate=3e-3",
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(data_dir, sae_run, tmp_path_factory):
    """An uninterrupted CoCoMix run with the labels computed for every batch: what every
    interrupted, resumed, cached or tampered run must reproduce."""
    src, sae, _ = sae_run
    out = str(tmp_path_factory.mktemp("reference"))
    spawn([sys.executable, "train.py", *cocomix(data_dir, src, sae, out, "--label_cache=False")])
    return out


def copy_data(data_dir, dst):
    os.makedirs(dst, exist_ok=True)
    for f in ("train.bin", "val.bin", "meta.json"):
        shutil.copy(os.path.join(data_dir, f), dst)
    return str(dst)


# -----------------------------------------------------------------------------
# 1. signals and kills: exact continuation, and no lost final checkpoint


def test_stop_during_the_final_evaluation_keeps_the_final_checkpoint(data_dir, tmp_path):
    """SIGTERM while the last evaluation runs: the run ends, and ckpt.pt is of the last step."""
    out = str(tmp_path / "run")
    hook = signal_in_final_eval(STEPS, "SIGTERM")
    p = spawn(
        hooked(
            "train.py",
            hook,
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            f"--max_iters={STEPS}",
            "--eval_interval=3",
            *TINY,
        )
    )
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == STEPS, (
        p.stdout
    )
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 3, 6, STEPS]


def test_scattered_non_finite_steps_do_not_stop_the_run(data_dir, tmp_path):
    """Ten non-finite gradients spread over a run are skipped one by one (10 in a row stop it)."""
    out = str(tmp_path / "run")
    bad = list(range(2, 21, 2))  # 10 steps, never two in a row
    p = spawn(
        hooked(
            "train.py",
            per_step("return torch.tensor(float('nan'))", bad),
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--max_iters=20",
            "--eval_interval=20",
            *TINY,
        )
    )
    assert p.stdout.count("non-finite loss or gradients, step skipped") == 10
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_stopped_and_resumed_run_is_the_uninterrupted_one(
    data_dir, sae_run, reference, tmp_path, how
):
    """A CoCoMix run (label cache on, dropout on) stopped in step 5 by Ctrl-C (saves after that
    step) or killed (-9: the checkpoint of step 4 survives), then resumed: bitwise the uninterrupted
    run's weights, optimizer and RNG, and the same log, with no record twice."""
    src, sae, _ = sae_run
    out = str(tmp_path / "run")
    args = cocomix(data_dir, src, sae, out)
    p = spawn(
        hooked("train.py", per_step(f"os.kill(os.getpid(), signal.{how})", [5]), *args), check=False
    )
    if how == "SIGINT":
        assert p.returncode == 130 and "stopped at step 5" in p.stdout, p.stderr[-2000:]
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 5
    else:
        assert p.returncode == -signal.SIGKILL
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 4
        assert max(r.get("train_step", 0) for r in read_log(out)) == 4  # step 5 was being taken
    spawn([sys.executable, "train.py", *args, "--init_from=resume"])
    same_state(os.path.join(reference, "ckpt.pt"), os.path.join(out, "ckpt.pt"))
    assert numbers(read_log(out)) == numbers(read_log(reference))


def test_reproduce_stop_reaches_a_stage_that_ignores_sigint(tmp_path):
    """reproduce.py stopped by SIGTERM stops its running stage even when the stage ignores SIGINT,
    as every process started by `nohup ... &` from a script does until it sets its own handler
    (train.py does so only after its imports): the stop is passed on as SIGTERM, which nothing
    inherits ignored."""
    # a stage before its handlers exist
    stage = "import time; print('sta' 'rted', flush=True); time.sleep(60)"
    code = (
        f"import signal, sys; sys.path.insert(0, {ROOT!r}); from cocomix import "
        "stages\nsignal.signal(signal.SIGTERM, "
        "signal.default_int_handler)\nstages.run_logged('train x', [sys.executable, '-c', "
        f"{stage!r}], {str(tmp_path / 'log')!r}, None)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        # the stage's output, not run_logged's echo of its command
        while "started" not in (line := p.stdout.readline()):
            assert line, f"the stage ended before it started: {p.stderr.read()[-2000:]}"
        p.send_signal(signal.SIGTERM)
        # SIGINT, ignored, would leave it waiting for the 60 s stage
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted in stage train x" in err, err


def test_reproduce_resumes_an_interrupted_stage_and_trusts_only_the_checkpoint(tmp_path, capsys):
    """reproduce.py's stages: a train.py that exits 0 with a checkpoint short of max_iters (stopped
    by a signal) leaves the stage unfinished, whatever its log says; the rerun resumes from that
    checkpoint (never deletes it) and records the checkpoint's budget; an interrupted attempt with
    other settings is refused unless --force."""
    from cocomix import stages

    fake = tmp_path / "fake_train.py"  # stands in for train.py: stops at step 4, or resumes to 10
    fake.write_text(
        "import sys, json, torch\nout = sys.argv[1]\nresume = '--init_from=resume' in sys.argv\n"
        "if resume:\n    assert torch.load(out + '/ckpt.pt', weights_only=True)['iter_num'] == 4\n"
        "torch.save({'iter_num': 10 if resume else 4}, out + '/ckpt.pt')\n"
        "open(out + '/log.jsonl', 'a').write(json.dumps({'iter': 10, 'val/loss': 1.0}) + '\\n')\n"
    )
    folder, cfg = str(tmp_path / "run"), {"max_iters": 10, "batch_size": 2, "block_size": 4}
    a, env = Namespace(force=False), dict(os.environ)

    def stage(settings, force=False):
        a.force = force
        return stages.command_stage(
            "train x",
            folder,
            settings,
            [os.path.join(folder, "ckpt.pt")],
            [stages.resumable([str(fake), folder], folder)],
            a,
            env,
            "train.log",
            lambda: stages.checkpoint_step("train x", folder, cfg),
        )

    with pytest.raises(SystemExit):
        stage({"lr": 1})
    assert "stopped at step 4 of max_iters=10" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(folder, "stage.json")) and os.path.exists(
        os.path.join(folder, "ckpt.pt")
    )
    rec = stage({"lr": 1})
    assert (
        rec["iter_num"] == 10
        and rec["tokens"] == 80
        and "resuming stage train x" in capsys.readouterr().out
    )
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "log.jsonl", "stage.json", "train.log"]
    # an interrupted attempt with other settings: refused, its checkpoint kept; --force discards it
    shutil.rmtree(folder)
    with pytest.raises(SystemExit):
        stage({"lr": 1})
    with pytest.raises(SystemExit):
        stage({"lr": 2})
    assert "interrupted attempt with other settings (lr)" in capsys.readouterr().err
    assert torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)["iter_num"] == 4
    with pytest.raises(SystemExit):  # redone from scratch: the fake stops at 4 again
        stage({"lr": 2}, force=True)
    assert "resuming" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 2. tampered label caches: detected, recomputed, never served


def test_tampered_labels_are_recomputed_not_served(data_dir, sae_run, reference, tmp_path):
    """Labels in labels-*.bin shifted to other valid ids, set to -5 or to ids >= C, and .done marks
    overwritten: the run recomputes them (with a warning) and logs the losses of
    --label_cache=False."""
    src, sae, _ = sae_run
    data = copy_data(data_dir, tmp_path / "data")
    spawn([sys.executable, "train.py", *cocomix(data, src, sae, str(tmp_path / "fill"))])
    files = [
        os.path.join(data, f)
        for f in os.listdir(data)
        if f.startswith("labels-") and f.endswith(".bin")
    ]
    assert len(files) == 2  # train and val
    for path in files:  # per window: labels changed in one of three ways, or its marks
        table = np.memmap(path, dtype=np.int16, mode="r+").reshape(-1, 32 * 4)
        done = np.memmap(path.replace(".bin", ".done"), dtype=np.uint64, mode="r+").reshape(-1, 2)
        filled = np.flatnonzero(done[:, 0])
        assert len(filled) >= 4
        shifted, negative, too_big, marks = np.array_split(filled, 4)
        # other valid ids
        table[shifted] = np.where(table[shifted] >= 0, (table[shifted] + 1) % 64, table[shifted])
        table[negative, 5] = -5
        table[too_big, 7] = 64  # C = 64
        done[marks, 0] ^= np.uint64(12345)
        table.flush(), done.flush()
        del table, done
    out = str(tmp_path / "tampered")
    p = spawn([sys.executable, "train.py", *cocomix(data, src, sae, out)])
    assert "fail their checksum or range" in p.stderr
    assert numbers(read_log(out)) == numbers(read_log(reference))


def test_label_cache_checks_each_window(tmp_path):
    """In process: each way of damaging one stored window makes that window (only) a recomputed
    miss."""
    from cocomix.label_cache import LabelCache, label_identity
    from sae import ConceptLabeler
    from tests.fixtures import T, cached, write_data, write_sae, write_source

    data = write_data(tmp_path / "data")
    src, sae_path = str(tmp_path / "source.pt"), str(tmp_path / "sae.pt")
    labeler = ConceptLabeler(write_source(src), write_sae(sae_path), 1, k_attr=4)
    identity = label_identity(labeler, src, sae_path, "float32")
    windows = [0, 1, 2, 3, 4]
    expected, _, _ = cached(LabelCache(labeler, data, "train", T, identity), data, windows)
    cache = LabelCache(labeler, data, "train", T, identity)
    table = cache.table
    table[0] = np.where(table[0] >= 0, (table[0] + 1) % 96, table[0])  # shifted to other valid ids
    table[1, 0, 0] = -5
    table[2, 3, 1] = 96  # C
    cache.done[3, 1] ^= np.uint64(2)  # the mark of the labels
    table.flush()
    cache.done.flush()
    fresh = LabelCache(labeler, data, "train", T, identity)
    got, _, _ = cached(fresh, data, windows)
    assert torch.equal(got, expected) and (fresh.hits, fresh.misses, fresh.rejected) == (1, 4, 4)
    again = LabelCache(labeler, data, "train", T, identity)  # repaired on disk
    assert torch.equal(cached(again, data, windows)[0], expected) and again.hits == 5


# -----------------------------------------------------------------------------
# 3. full disks (a small tmpfs; skipped where this machine cannot mount one)


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(size):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        try:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no mount command: cannot make a small disk to fill")
        if r.returncode:
            pytest.skip(
                "cannot mount a small tmpfs here (needs root "
                f"where mounting is allowed): {r.stderr.strip()}"
            )
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)])


def fill(disk, leave):
    """Fill the disk but for about `leave` bytes."""
    st = os.statvfs(disk)
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(b"\1" * max(st.f_bavail * st.f_frsize - leave, 0))


def test_full_disk_under_the_label_cache(data_dir, sae_run, reference, small_disk, tmp_path):
    """The labels' memory map would die of SIGBUS on a full disk: the cache turns writing off with a
    warning, and the run goes on with the losses of --label_cache=False."""
    src, sae, _ = sae_run
    data = copy_data(data_dir, small_disk("1m") / "data")
    fill(os.path.dirname(data), 12 * 1024)
    out = str(tmp_path / "run")
    p = spawn([sys.executable, "train.py", *cocomix(data, src, sae, out)], check=False)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "warning: label cache off" in p.stderr and "Traceback" not in p.stderr
    assert numbers(read_log(out)) == numbers(read_log(reference))


def test_full_disk_while_saving_a_checkpoint(data_dir, small_disk):
    """Room for one checkpoint (~20 MB) and not two: the second save fails with one line and a
    non-zero exit, leaving the first checkpoint whole and no temporary file."""
    out = str(small_disk("30m") / "run")
    p = spawn(
        [
            sys.executable,
            "train.py",
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--max_iters=4",
            "--eval_interval=2",
            "--always_save_checkpoint=True",
            *TINY,
        ],
        check=False,
    )
    one_line_error(p, "cannot write")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 2


def test_full_disk_while_preparing_data(small_disk):
    src = os.path.join(os.environ.get("COCOMIX_DATA", ""), "tinyshakespeare", "input.txt")
    if not os.path.exists(src):
        pytest.skip("no tinyshakespeare under COCOMIX_DATA")
    disk = small_disk("400k")
    p = spawn(
        [sys.executable, "prepare.py", "--input", src, "--out_dir", str(disk / "data")], check=False
    )
    one_line_error(p, "cannot write in")
    assert os.listdir(disk) == []  # no temporary file, no empty folder


def test_prepare_removes_the_temporary_files_of_killed_runs(tmp_path):
    """kill -9 skips prepare.py's clean-up: its next run removes what a dead process left, never a
    live one's."""
    from prepare import prepare

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "data"
    out.mkdir()
    (out / f".stream.tmp-{dead.pid}").write_bytes(b"\0" * 4096)
    (out / ".val.tmp-1").write_bytes(b"")  # PID 1 is alive
    text = tmp_path / "a.txt"
    text.write_text("Some text to prepare. " * 200)
    prepare([str(text)], str(out), verbose=False)
    assert sorted(os.listdir(out)) == [".val.tmp-1", "meta.json", "train.bin", "val.bin"]


# -----------------------------------------------------------------------------
# 4. two runs on one folder


def test_second_run_on_a_busy_out_dir_is_refused_and_a_killed_runs_lock_is_taken_over(
    data_dir, tmp_path
):
    out = str(tmp_path / "run")
    args = ["train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY]
    first = subprocess.Popen(
        [sys.executable, *args, "--max_iters=1000000", "--eval_interval=1000000"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock, deadline = os.path.join(out, "lock"), time.time() + 120
        while time.time() < deadline and not (os.path.exists(os.path.join(out, "log.jsonl"))):
            time.sleep(0.2)
        assert json.load(open(lock))["pid"] == first.pid
        second = spawn([sys.executable, *args, "--max_iters=2", "--eval_interval=2"], check=False)
        one_line_error(second, f"is in use by another run (PID {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert json.load(open(lock))["pid"] == first.pid  # left behind by kill -9, but no longer held
    spawn([sys.executable, *args, "--max_iters=2", "--eval_interval=2"])
    assert not os.path.exists(lock)
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 2]  # this run's log only


# -----------------------------------------------------------------------------
# 5. SAE files: stable bytes, their host checked


def test_sae_retrained_identically_has_the_same_bytes(sae_run):
    """The SAE's file holds no wall time: the same command gives the same file, so its label cache
    is reused."""
    _, sae, cmd = sae_run
    digest = lambda: hashlib.sha256(open(sae, "rb").read()).hexdigest()
    before = digest()
    run(*cmd)
    assert digest() == before


@pytest.fixture(scope="module")
def other_source(sae_run, tmp_path_factory):
    """A concept source of the same width and layers as the SAE's host, with other weights."""
    src, _, _ = sae_run
    ckpt = torch.load(src, weights_only=True)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    path = str(tmp_path_factory.mktemp("other") / "ckpt.pt")
    save_atomic(ckpt, path)  # with the digest of its new weights
    return path


# -----------------------------------------------------------------------------
# 6. bad settings and corrupt files: one line, non-zero exit, nothing written


def train_defaults():
    """train.py's settings block (plain literals), as its configurator starts from."""
    src = open(os.path.join(ROOT, "train.py")).read()
    env = {}
    exec(src[src.index("# ---") : src.index("config_keys = ")], env)
    return env


@pytest.mark.parametrize(
    "arg,message",
    [
        ("--grad_clip=-1.0", "grad_clip must be >= 0"),
        ("--eval_interval=0", "eval_interval, log_interval and eval_iters must be positive"),
        ("--log_interval=0", "eval_interval, log_interval and eval_iters must be positive"),
        ("--eval_iters=0", "eval_interval, log_interval and eval_iters must be positive"),
        ("--dtype=float64", "dtype must be one of auto, float32, bfloat16, float16"),
        ("--data_order=shuffled", "data_order must be one of random, epoch"),
        ("--learning_rate=-0.001", "learning_rate and weight_decay must be >= 0"),
        ("--learning_rate=1e999", "learning_rate must be finite"),
        ("--min_lr=-0.5", "min_lr >= 0 (or -1"),
        ("--beta2=2.0", "beta1 and beta2 must be in [0, 1)"),
        ("--dropout=1.0", "dropout must be in [0, 1)"),
        ("--k_attr=0", "k_attr and concept_topk must be positive"),
        ("--init_from=resum", "init_from must be 'scratch', 'resume', a GPT-2 name"),
        ("--device=tpu", "device must be auto, cpu, cuda, cuda:N or mps"),
        ("--device=cuda", "CUDA is not available"),
    ],
)
def test_settings_checks(arg, message):
    """train.py's configurator and check_config on each bad value (the first thing train.py runs; a
    few go through train.py itself in the table below)."""
    from cocomix.checks import check_config

    if arg == "--device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = train_defaults()
    keys = [
        k
        for k, v in env.items()
        if not k.startswith("_") and isinstance(v, (int, float, bool, str))
    ]
    with mock.patch.object(sys, "argv", ["train.py", arg]):
        exec(open(os.path.join(ROOT, "configurator.py")).read(), env)
    assert message in (check_config({k: env[k] for k in keys}) or ""), arg
    assert check_config({k: train_defaults()[k] for k in keys}) is None


def test_config_file_with_a_bom_reads_as_without(tmp_path):
    """A config file saved with a UTF-8 BOM (a Windows editor's) sets what it says, not a syntax
    error on its first character."""
    cfg = tmp_path / "cfg.py"
    cfg.write_bytes("\ufeffn_layer = 3\nlearning_rate = 3e-4\n".encode())
    env = train_defaults()
    with mock.patch.object(sys, "argv", ["train.py", str(cfg)]):
        exec(open(os.path.join(ROOT, "configurator.py")).read(), env)
    assert (env["n_layer"], env["learning_rate"]) == (3, 3e-4)


def write_safetensors(tensors, path, offsets=None):
    """A .safetensors file written by hand (F32 and I32 only), with the data offsets given or
    packed."""
    import struct

    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": {torch.float32: "F32", torch.int32: "I32"}[t.dtype],
            "shape": list(t.shape),
            "data_offsets": (offsets or {}).get(name, [len(data), len(data) + len(raw)]),
        }
        data += raw
    head = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(head)) + head + data)


def test_safetensors_overlap_and_integer_weights(tmp_path):
    """Two tensors sharing bytes, and integer weights where GPT-2 has floats (copied as numbers they
    gave NaN logits): both refused with the file and tensor named."""
    from cocomix.weights import load_safetensors
    from model import GPT, GPTConfig

    path = str(tmp_path / "overlap.safetensors")
    write_safetensors({"a": torch.zeros(4), "b": torch.zeros(2)}, path, offsets={"b": [8, 16]})
    with pytest.raises(ValueError, match="tensors 'a' and 'b' overlap"):
        load_safetensors(path)
    # a GPT-2 folder as Hugging Face lays it out, one matrix stored as int32
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {
        k.removeprefix("transformer."): v.t() if k.endswith(conv1d) else v
        for k, v in GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8))
        .state_dict()
        .items()
        if k != "lm_head.weight"
    }
    sd["h.0.mlp.c_fc.weight"] = (sd["h.0.mlp.c_fc.weight"] * 100).to(torch.int32)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"n_positions": 16, "vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 8})
    )
    write_safetensors(sd, str(folder / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match="h.0.mlp.c_fc.weight has dtype torch.int32; GPT-2 weights are floating point",
    ):
        GPT.from_pretrained(str(folder))
    # GPT-2 variants that Hugging Face runs differently, and an untied head: refused, not run as
    # plain GPT-2
    sd["h.0.mlp.c_fc.weight"] = sd["h.0.mlp.c_fc.weight"].float()
    config = {"n_positions": 16, "vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 8}
    for key, value in (
        ("tie_word_embeddings", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("scale_attn_weights", False),
    ):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"config.json sets {key}="):
            GPT.from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(
        {**sd, "lm_head.weight": sd["wte.weight"] + 1}, str(folder / "model.safetensors")
    )
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(str(folder))
    write_safetensors(
        {**sd, "lm_head.weight": sd["wte.weight"].clone()}, str(folder / "model.safetensors")
    )
    assert GPT.from_pretrained(str(folder)).config.n_embd == 8  # a tied copy is fine
    # an SAE trained on a GPT-2 folder records the folder's hash (it used to record none), so an SAE
    # made on one GPT-2 folder is refused for another of the same width
    from cocomix.sae_cli import arg_parser, run_settings
    from cocomix.weights import source_sha256
    from sae import SAE, check_sae_host

    _, meta = run_settings(
        arg_parser().parse_args([f"--concept_source={folder}", "--data_dir=d", "--layer=0"]),
        GPT.from_pretrained(str(folder)).config,
    )
    assert meta["host_sha256"] == source_sha256(str(folder)) and len(meta["host_sha256"]) == 64
    sae = SAE(8, 16, 2, meta)
    check_sae_host(sae, str(folder))
    other = tmp_path / "gpt2_other"
    shutil.copytree(folder, other)
    write_safetensors({**sd, "wte.weight": sd["wte.weight"] + 1}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="was trained on"):
        check_sae_host(sae, str(other))


def make_files(root, data_dir, src, sae):
    """The damaged files the table's cases point at, in root."""
    ok = torch.load(src, weights_only=True)
    for name, content in (("empty", b""), ("random", np.random.default_rng(0).bytes(4096))):
        os.makedirs(root / name)
        (root / name / "ckpt.pt").write_bytes(content)
    for name, change in (
        ("unknown_key", lambda c: c["model_args"].update(n_experts=8)),
        ("no_optimizer", lambda c: c.pop("optimizer")),
    ):
        c = dict(ok, model_args=dict(ok["model_args"]))
        change(c)
        os.makedirs(root / name)
        save_atomic(c, root / name / "ckpt.pt")  # damaged as written, not after
    (root / "empty_sae.pt").write_bytes(b"")
    for name, change in (
        ("val0", lambda d: open(d / "val.bin", "wb").close()),
        ("meta_cut", lambda d: (d / "meta.json").write_text('{"tokenizer": "gp')),
        ("meta_list", lambda d: (d / "meta.json").write_text("[1, 2]")),
        (
            "llama",
            lambda d: (d / "meta.json").write_text(
                json.dumps(dict(json.load(open(d / "meta.json")), tokenizer="llama"))
            ),
        ),
    ):
        change(root / os.path.basename(copy_data(data_dir, root / name)))
    (root / "bad.py").write_text("max_iters = '10'\n")
    (root / "raises.py").write_text("max_iters = 1 // 0\n")
    (root / "concepts.json").write_text(json.dumps({"concepts": [1, 2, 3]}))
    copy_data(data_dir, root / "fresh")
    # a finished run to resume with other settings
    shutil.copytree(os.path.dirname(src), root / "resumed")


def cases(root, data, src, sae, other, cocomix_run):
    """id -> (argv, expected fragment of the one error line; None: exit 0 with a warning)."""
    T = [*TINY, "--max_iters=2", "--eval_interval=2"]
    fresh = lambda name: [f"--data_dir={data}", f"--out_dir={root / 'out' / name}", *T]
    resume = lambda name, *a: [
        f"--data_dir={data}",
        f"--out_dir={root / name}",
        "--init_from=resume",
        *T,
        *a,
    ]
    sae_args = [
        f"--concept_source={src}",
        f"--data_dir={data}",
        "--layer=1",
        "--n_latents=64",
        "--k=4",
        "--tokens=2048",
        "--batch_size=256",
        "--buffer=1024",
        "--eval_tokens=512",
    ]
    co = lambda *a: [
        "--mode=cocomix",
        f"--concept_source={src}",
        f"--sae_path={sae}",
        "--concept_topk=8",
        *a,
    ]
    return {
        "grad_clip": (
            ["train.py", *fresh("grad_clip"), "--grad_clip=-1.0"],
            "grad_clip must be >= 0",
        ),
        "config_type": (
            ["train.py", str(root / "bad.py"), *fresh("config_type")],
            "sets max_iters to '10', expected a int",
        ),
        "config_raises": (
            ["train.py", str(root / "raises.py"), *fresh("config_raises")],
            "ZeroDivisionError",
        ),
        "empty_ckpt": (
            ["train.py", *resume("empty")],
            "empty (0 bytes), not a readable checkpoint",
        ),
        "random_ckpt": (["train.py", *resume("random")], "not a readable checkpoint ("),
        "unknown_model_arg": (["train.py", *resume("unknown_key")], "n_experts"),
        "no_optimizer": (
            ["train.py", *resume("no_optimizer")],
            "cannot be resumed: it has no optimizer",
        ),
        "resume_other_data": (
            ["train.py", *resume("resumed_data"), f"--data_dir={root / 'fresh'}"],
            "data_dir=",
        ),
        "resume_other_batch": (
            ["train.py", *resume("resumed_batch", "--batch_size=8")],
            "batch_size=8 (checkpoint: 4)",
        ),
        "resume_other_lr": (
            ["train.py", *resume("resumed_lr", "--learning_rate=0.01", "--max_iters=12")],
            None,
        ),
        "empty_val": (
            ["train.py", *fresh("empty_val"), f"--data_dir={root / 'val0'}"],
            "holds 0 tokens",
        ),
        "meta_truncated": (
            ["train.py", *fresh("meta_cut"), f"--data_dir={root / 'meta_cut'}"],
            "unreadable (JSONDecodeError)",
        ),
        "meta_list": (
            ["train.py", *fresh("meta_list"), f"--data_dir={root / 'meta_list'}"],
            "not a JSON object",
        ),
        "labels_before_checks": (
            ["train.py", *fresh("labels"), f"--data_dir={root / 'fresh'}", *co("--insert_layer=7")],
            "insert_layer=7 is outside",
        ),
        "sae_other_host": (
            ["train.py", *fresh("other_host"), *co(), f"--concept_source={other}"],
            "was trained on",
        ),
        "sae_eval_other_host": (
            [
                "sae.py",
                "--eval_only",
                f"--sae_path={sae}",
                f"--concept_source={other}",
                f"--data_dir={data}",
            ],
            "was trained on",
        ),
        "steer_other_host": (
            [
                "sample.py",
                f"--out_dir={cocomix_run}",
                "--steer_source=1:2",
                f"--concept_source={other}",
                f"--sae_path={sae}",
                "--max_new_tokens=2",
                "--device=cpu",
            ],
            "was trained on",
        ),
        "sae_no_latents": (
            ["sae.py", *sae_args, "--n_latents=0", f"--sae_path={root / 'sae_0' / 'sae.pt'}"],
            "--n_latents must be positive",
        ),
        "sae_other_tokenizer": (
            [
                "sae.py",
                *sae_args,
                f"--data_dir={root / 'llama'}",
                f"--sae_path={root / 'sae_l' / 'sae.pt'}",
            ],
            "prepared with tokenizer 'llama'",
        ),
        "sae_empty_file": (
            [
                "sae.py",
                "--eval_only",
                f"--sae_path={root / 'empty_sae.pt'}",
                f"--concept_source={src}",
                "--layer=1",
                f"--data_dir={data}",
            ],
            "empty (0 bytes), not a readable SAE file",
        ),
        "sae_lr_1e6": (
            ["sae.py", *sae_args, "--lr=1e6", f"--sae_path={root / 'sae_lr' / 'sae.pt'}"],
            "the trained SAE is unusable",
        ),
        "sample_temperature": (
            ["sample.py", f"--out_dir={src}", "--temperature=-1", "--device=cpu"],
            "--temperature must be >= 0",
        ),
        "sample_top_k": (
            ["sample.py", f"--out_dir={src}", "--top_k=-5", "--device=cpu"],
            "--top_k, --shift and --width",
        ),
        "sample_concepts": (
            [
                "sample.py",
                f"--out_dir={cocomix_run}",
                "--inspect",
                f"--concepts={root / 'concepts.json'}",
                "--max_new_tokens=2",
                "--device=cpu",
            ],
            "not a concept dictionary",
        ),
    }


CASE_IDS = [
    "grad_clip",
    "config_type",
    "config_raises",
    "empty_ckpt",
    "random_ckpt",
    "unknown_model_arg",
    "no_optimizer",
    "resume_other_data",
    "resume_other_batch",
    "resume_other_lr",
    "empty_val",
    "meta_truncated",
    "meta_list",
    "labels_before_checks",
    "sae_other_host",
    "sae_eval_other_host",
    "steer_other_host",
    "sae_no_latents",
    "sae_other_tokenizer",
    "sae_empty_file",
    "sae_lr_1e6",
    "sample_temperature",
    "sample_top_k",
    "sample_concepts",
]


@pytest.fixture(scope="module")
def outcomes(data_dir, sae_run, other_source, reference, tmp_path_factory):
    """Every case of the table run once, three at a time: {id: (completed process, root)}."""
    src, sae, _ = sae_run
    root = tmp_path_factory.mktemp("cases")
    make_files(root, data_dir, src, sae)
    # one folder per run: two would meet at its lock
    for name in (
        "resumed_data",
        "resumed_batch",
        "resumed_lr",
    ):
        shutil.copytree(root / "resumed", root / name)
    table = cases(root, data_dir, src, sae, other_source, reference)
    assert sorted(table) == sorted(CASE_IDS)
    before = {
        name: open(root / name / "ckpt.pt", "rb").read()
        for name in ("resumed_data", "resumed_batch", "no_optimizer")
    }
    with ThreadPoolExecutor(3) as pool:
        done = dict(
            zip(
                table,
                pool.map(lambda c: spawn([sys.executable, *c[0]], check=False), table.values()),
            )
        )
    return {k: (done[k], table[k][1]) for k in table}, root, before


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_and_writes_nothing(outcomes, case):
    results, root, before = outcomes
    p, message = results[case]
    if message is None:  # allowed, with a warning
        assert (
            p.returncode == 0
            and "warning: resuming" in p.stderr
            and "learning_rate=0.01" in p.stderr
        ), p.stderr[-2000:]
        return
    one_line_error(p, message)
    # torch's advice to load with pickle code enabled is never passed on
    assert "weights_only" not in p.stderr
    assert not any(root.glob("out/*"))  # train.py: no out_dir left behind
    for name, content in before.items():
        assert open(root / name / "ckpt.pt", "rb").read() == content
    assert not [
        f for f in os.listdir(root / "fresh") if f.startswith("labels-")
    ]  # refused before any label file
    assert not [*root.glob("sae_*/sae.pt"), *root.glob("sae_*/*.resume.pt"), *root.rglob("*.tmp")]
