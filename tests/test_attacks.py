"""The attack suite, round three (the first two are in test_faults.py): a resume that must apply
what it says it applied, stages that must not trust a swapped file nor delete a live run's files,
and one-line errors, quiet Ctrl-C and clean full-disk failures in every entry point. Each case runs
the scripts as subprocesses on tiny models, or calls the checks directly where that says the
same."""

import json
import os
import shutil
import signal
import subprocess
import sys
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cocomix.weights import save_atomic
from tests.fixtures import ENV, ROOT, TINY, signal_in_final_eval
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
    """--beta1, --beta2 and --weight_decay changed on resume reach the optimizer's param groups
    (they used to be overwritten by the checkpoint's, though the warning and the config said
    otherwise)."""
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
    hook = signal_in_final_eval(STEPS + 1, "SIGKILL")
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
    from cocomix import stages

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
            stages.command_stage(
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


# -----------------------------------------------------------------------------
# T1-T16 and the misleading messages: one line naming the setting or file, quiet Ctrl-C, full disks


def child(target, args, hook="", env=None):
    """argv of `python target args` (a root script, or scripts.NAME as with -m), running `hook`
    (Python code) first; env: variables to set for it."""
    run = (
        f"runpy.run_module({target!r}, run_name='__main__', alter_sys=True)"
        if target.startswith("scripts.")
        else f"runpy.run_path({target!r}, run_name='__main__')"
    )
    code = f"{hook}\nimport runpy, sys\nsys.argv = [{target!r}, *sys.argv[1:]]\n{run}"
    return [sys.executable, "-c", code, *args], env or {}


# the disk is full: every write past `n` bytes of a file fails with EFBIG (SIGXFSZ ignored, else it
# kills the process), as a full disk fails writes with ENOSPC
FULL_DISK = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({n}, {n}))"""
# Ctrl-C the moment the script first calls torch.{fn}
CTRL_C = """
import os, signal, torch
_f = torch.{fn}
def _hook(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)
    return _f(*a, **k)
torch.{fn} = _hook"""
# a step's log record cannot be written (a full disk), or out_dir is removed, at step 3's log record
AT_STEP_3 = """
import builtins, os, shutil
_open = builtins.open
def _hooked(path, *a, **k):
    log = str(path).endswith('log.jsonl') and os.path.exists(path)
    if log and _open(path).read().count('train_step') == 2:
        {action}
    return _open(path, *a, **k)
builtins.open = _hooked"""
LIMIT_8G = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))"
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def bad_runs(data_dir, finished, source_and_sae, tmp_path_factory):
    """Every case of the table run once, three at a time: {id: (process, folder, expected)}."""
    root = tmp_path_factory.mktemp("attacks")
    src, sae = source_and_sae
    # a diverged model: perplexity past what a float holds
    c = ckpt(finished)
    c["model"]["transformer.wte.weight"].mul_(1e6)  # tied: the LM head's too
    save_atomic(c, str(root / "diverged.pt"))  # as train.py saves one, with its digest
    # a CoCoMix student (random weights) for sample.py --inspect --html
    from model import GPT, GPTConfig

    cfg = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    cfg.update(n_concepts=64, concept_topk=8, insert_layer=1, mix="interleave")
    torch.save({"model": GPT(GPTConfig(**cfg)).state_dict(), "model_args": cfg}, root / "co.pt")
    (root / "empty_cache").mkdir()
    T = [f"--data_dir={data_dir}", *TINY, "--max_iters=6", "--eval_interval=100"]
    out = lambda name: str(root / name)
    ev = [f"--ckpt={finished}/ckpt.pt", f"--data_dir={data_dir}", "--max_tokens=64", "--device=cpu"]
    table = {
        "T1_n_head": (child("train.py", [*T, f"--out_dir={out('t1')}", "--n_head=0"]), "n_head"),
        "T2_seed": (child("train.py", [*T, f"--out_dir={out('t2')}", "--seed=-1"]), "seed must"),
        "T3_n_embd": (
            child("train.py", [*T, f"--out_dir={out('t3')}", "--n_embd=100000"]),
            "n_embd",
        ),
        "T3_batch_size": (
            # the process's memory limited to 8 GiB: the check reads the limit
            child("train.py", [*T, f"--out_dir={out('t3b')}", "--batch_size=2000"], LIMIT_8G),
            "batch_size=2000, block_size=32: the step needs at least",
        ),
        "T2_seeds": (
            child("reproduce.py", ["--preset=tiny", f"--out_dir={out('r2')}", "--seeds=1,-3"]),
            "--seeds: -3 is not a seed",
        ),
        "T4_num_proc": (
            child(
                "prepare.py", ["--input", out("t4.txt"), f"--out_dir={out('t4')}", "--num_proc=-1"]
            ),
            "--num_proc must be >= 1, got -1",
        ),
        "T4_doc_separator": (
            child(
                "prepare.py",
                ["--input", out("t4.txt"), f"--out_dir={out('t4')}", "--doc_separator="],
            ),
            "--doc_separator must not be empty",
        ),
        "T5_block_size": (child("scripts.eval", [*ev, "--block_size=-1"]), "--block_size must be"),
        "T6_seeds": (
            child("reproduce.py", ["--preset=tiny", f"--out_dir={out('r6')}", "--seeds=a"]),
            "--seeds: a is not a seed",
        ),
        "T7_overflow": (child("scripts.eval", [*ev[1:], f"--ckpt={root / 'diverged.pt'}"]), 0),
        "T8_full_disk_at_start": (
            child("train.py", [*T, f"--out_dir={out('t8')}"], FULL_DISK.format(n=0)),
            f"cannot write in {out('t8')}",
        ),
        "T9_log_write_fails": (
            child(
                "train.py",
                [*T, f"--out_dir={out('t9')}"],
                AT_STEP_3.format(action="raise OSError(28, 'No space left on device')"),
            ),
            f"cannot write {out('t9')}/log.jsonl (No space "
            f"left on device); {out('t9')}/ckpt.pt holds step 3",
        ),
        "T10_out_dir_removed": (
            child(
                "train.py",
                [*T, f"--out_dir={out('t10')}"],
                AT_STEP_3.format(action=f"shutil.rmtree({out('t10')!r})"),
            ),
            f"cannot write {out('t10')}/log.jsonl (No such file or directory)",
        ),
        "T11_eval_out_full_disk": (
            child("scripts.eval", [*ev, f"--out={out('t11')}/r.json"], FULL_DISK.format(n=100)),
            f"cannot write {out('t11')}/r.json (File too large",
        ),
        "T12_html_full_disk": (
            child(
                "sample.py",
                [f"--out_dir={root / 'co.pt'}", "--inspect", f"--html={out('t12.html')}"]
                + ["--max_new_tokens=2", "--device=cpu"],
                FULL_DISK.format(n=100),
            ),
            f"cannot write {out('t12.html')} (File too large",
        ),
        "T13_no_tokenizer": (
            child(
                "sae.py",
                ["--describe", f"--sae_path={sae}", f"--concept_source={src}", "--layer=1"]
                + [f"--data_dir={data_dir}", "--eval_tokens=64", "--device=cpu"],
                env={"TIKTOKEN_CACHE_DIR": out("empty_cache"), **OFFLINE},
            ),
            "GPT-2's tokenizer is unavailable",
        ),
        "T14_gpt2_offline": (
            child(
                "train.py",
                [*T, f"--out_dir={out('t14')}", "--init_from=gpt2"],
                env={"HOME": out("empty_cache"), **OFFLINE},
            ),
            "--init_from=gpt2: could not download",
        ),
        "T15_ctrl_c_start_up": (
            child("train.py", [*T, f"--out_dir={out('t15')}"], CTRL_C.format(fn="manual_seed")),
            130,
        ),
        "T16_ctrl_c_describe": (
            child(
                "sae.py",
                ["--describe", f"--sae_path={sae}", f"--concept_source={src}", "--layer=1"]
                + [f"--data_dir={data_dir}", "--device=cpu"],
                CTRL_C.format(fn="load"),
            ),
            130,
        ),
        "T16_ctrl_c_eval": (child("scripts.eval", ev, CTRL_C.format(fn="load")), 130),
        "T16_ctrl_c_sample": (
            child("sample.py", [f"--out_dir={finished}", "--device=cpu"], CTRL_C.format(fn="load")),
            130,
        ),
        "T16_ctrl_c_export": (
            child(
                "scripts.export_hf",
                [f"--ckpt={finished}", f"--out={out('hf')}"],
                CTRL_C.format(fn="load"),
            ),
            130,
        ),
        "eval_device": (child("scripts.eval", [*ev, "--device=foo"]), "device must be auto, cpu"),
        "sae_tokens_1": (
            child(
                "sae.py",
                [f"--concept_source={src}", f"--data_dir={data_dir}", "--layer=1", "--tokens=1"]
                + [f"--sae_path={out('sae1')}/sae.pt"],
            ),
            "--tokens=1 is less than one batch",
        ),
        "reproduce_set_junk": (
            child("reproduce.py", ["--preset=tiny", f"--out_dir={out('r_set')}", "--set", "junk"]),
            "--set 'junk': expected KEY=VALUE",
        ),
        "reproduce_sae_path_alone": (
            child(
                "reproduce.py", ["--preset=tiny", f"--out_dir={out('r_sae')}", f"--sae_path={sae}"]
            ),
            "--sae_path needs --concept_source",
        ),
    }
    (root / "t4.txt").write_text("Some text to prepare. " * 100)

    def go(case):
        (argv, env), _ = case
        return subprocess.run(
            argv, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=600
        )

    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(table, pool.map(go, table.values())))
    return {k: (done[k], root, table[k][1]) for k in table}


CASES = [
    "T1_n_head",
    "T2_seed",
    "T2_seeds",
    "T3_n_embd",
    "T3_batch_size",
    "T4_num_proc",
    "T4_doc_separator",
    "T5_block_size",
    "T6_seeds",
    "T7_overflow",
    "T8_full_disk_at_start",
    "T9_log_write_fails",
    "T10_out_dir_removed",
    "T11_eval_out_full_disk",
    "T12_html_full_disk",
    "T13_no_tokenizer",
    "T14_gpt2_offline",
    "T15_ctrl_c_start_up",
    "T16_ctrl_c_describe",
    "T16_ctrl_c_eval",
    "T16_ctrl_c_sample",
    "T16_ctrl_c_export",
    "eval_device",
    "sae_tokens_1",
    "reproduce_set_junk",
    "reproduce_sae_path_alone",
]


@pytest.mark.parametrize("case", CASES)
def test_attack(bad_runs, case):
    assert sorted(bad_runs) == sorted(CASES)
    p, root, expected = bad_runs[case]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if expected == 0:  # T7: the diverged model's perplexity is inf, not an OverflowError
        assert p.returncode == 0 and "inf" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])
        return
    if expected == 130:  # Ctrl-C: one line, status 130, nothing written
        assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
        assert [ln for ln in p.stderr.splitlines() if ln.startswith("interrupted:")], p.stderr
        assert not (root / "t15").exists() and not (root / "hf").exists()
        return
    one_line_error(p, expected)
    # nothing half-written: no temporary, empty or lock file, no folder left by a refused run
    assert not [f for f in root.rglob("*") if f.name.endswith(".tmp") or f.name == "lock"]
    assert not [f for f in root.rglob("*") if f.is_file() and f.stat().st_size == 0]
    if case.startswith("T8"):
        assert not (root / "t8").exists()
    if case.startswith("T9"):  # the steps were saved before the run stopped
        assert ckpt(root / "t9")["iter_num"] == 3
    if case.startswith("T11"):
        assert not (root / "t11" / "r.json").exists()
    if case.startswith("reproduce"):  # refused before the first stage
        assert not (root / case.replace("reproduce_", "r_").replace("_path_alone", "")).exists()


# -----------------------------------------------------------------------------
# S2: checkpoints and SAE files carry a digest of their tensors, which every loader checks


def flip_tensor_byte(path, tensor):
    """Flip one byte inside `tensor`'s data in the torch file at path, as disk damage or an edit
    would: the file stays a readable zip and pickle."""
    raw = bytearray(open(path, "rb").read())
    at = raw.find(tensor.contiguous().numpy().tobytes()[:64])
    assert at > 0
    raw[at + 5] ^= 0x10
    open(path, "wb").write(bytes(raw))


def test_a_flipped_byte_in_a_checkpoint_is_refused_by_every_loader(data_dir, finished, tmp_path):
    from model import load_checkpoint, load_frozen_gpt

    out = copy_run(finished, tmp_path)
    path = os.path.join(out, "ckpt.pt")
    flip_tensor_byte(path, ckpt(out)["model"]["transformer.wpe.weight"])
    for load in (load_checkpoint, load_frozen_gpt):
        with pytest.raises(ValueError, match=f"{path}: its tensors do not match the digest"):
            load(path)
    p = train(data_dir, out, "--init_from=resume", f"--max_iters={STEPS + 1}", check=False)
    one_line_error(p, f"{path}: its tensors do not match the digest")


def test_a_flipped_byte_in_an_sae_file_is_refused(tmp_path, capsys):
    from sae import SAE

    path = str(tmp_path / "sae.pt")
    sae = SAE(32, 64, 4, meta={"layer": 1})
    sae.save(path)
    w = sae.state_dict()["decoder.weight"]
    assert torch.equal(SAE.load(path).state_dict()["decoder.weight"], w)
    flip_tensor_byte(path, w)
    with pytest.raises(ValueError, match=f"{path}: its tensors do not match the digest"):
        SAE.load(path)
    # a file written before digests: loaded, with a one-line note naming it
    old = str(tmp_path / "old.pt")
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "digest"}, old)
    SAE.load(old)
    SAE.load(old)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert notes == [
        f"note: {old} has no content digest (written before they were kept); loaded unchecked"
    ]


# -----------------------------------------------------------------------------
# S4, S5: a stage's stage.json holds the SHA-256 of what it wrote and read; a rerun checks them


def test_reproduce_stage_refuses_a_swapped_output_or_input(tmp_path, capsys):
    """A finished stage whose checkpoint was replaced (S4: KD's ckpt.pt copied over NTP's; S5: the
    source retrained by hand) or whose input changed is refused naming the stage and the file; the
    same bytes skip it."""
    from cocomix import stages

    folder, src = tmp_path / "run", tmp_path / "source.pt"
    src.write_bytes(b"source weights")
    write = "import sys; open(sys.argv[1], 'w').write('ntp weights')"

    def stage():
        return stages.command_stage(
            "train ntp seed 1",
            str(folder),
            {"lr": 1},
            [str(folder / "ckpt.pt")],
            [["-c", write, str(folder / "ckpt.pt")]],
            Namespace(force=False),
            dict(os.environ),
            "train.log",
            inputs=[str(src)],
        )

    rec = stage()
    assert set(rec["outputs"]) == {"ckpt.pt"} and set(rec["inputs"]) == {"../source.pt"}
    stage()
    assert "skip train ntp seed 1: done" in capsys.readouterr().out
    (folder / "ckpt.pt").write_text("kd weights")  # S4
    with pytest.raises(SystemExit):
        stage()
    err = capsys.readouterr().err
    assert f"stage train ntp seed 1: {folder}/ckpt.pt is not the file the stage wrote" in err, err
    (folder / "ckpt.pt").write_text("ntp weights")
    src.write_bytes(b"retrained by hand")  # S5
    with pytest.raises(SystemExit):
        stage()
    assert f"{src} is not the file the stage read" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# S3: meta.json holds a digest of each token file, which every reader checks


def test_a_token_file_replaced_in_place_is_refused(data_dir, tmp_path):
    """train.bin with two tokens swapped (same size, every id valid, meta.json untouched): refused
    by load_tokens, which train.py (fresh or resumed), sae.py, eval and reproduce.py read
    through."""
    import numpy as np

    from cocomix.corpus import load_tokens
    from tests.test_faults import copy_data

    data = copy_data(data_dir, tmp_path / "data")
    meta = json.load(open(os.path.join(data, "meta.json")))
    assert set(meta["digests"]) == {"train.bin", "val.bin"}
    assert len(load_tokens(data, "train")) == meta["splits"]["train"]["tokens"]
    tokens = np.memmap(os.path.join(data, "train.bin"), dtype=np.uint16, mode="r+")
    i = int(np.flatnonzero(tokens[1:1000] != tokens[0])[0]) + 1
    tokens[[0, i]] = tokens[[i, 0]]
    tokens.flush()
    del tokens
    with pytest.raises(ValueError, match="train.bin is not the file prepare.py wrote"):
        load_tokens(data, "train")
    p = train(data, str(tmp_path / "run"), check=False)
    one_line_error(p, f"{data}/train.bin is not the file prepare.py wrote")
