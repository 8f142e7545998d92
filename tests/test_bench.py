"""bench.py's and bench_compile.py's modes at smoke-test size, so that the scripts meant for other
machines (--gpu_mfu) or for later (--split, --bars) do not rot. One step each, no timing claims."""

import math
import os
import subprocess
import sys

import pytest
import torch

import cocomix.flops as flops
import scripts.bench as bench
import scripts.bench_compile as bench_compile
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--tiny", "--rounds=1", "--warmup=0", "--steps=1"]


def test_gpu_mfu_cpu_path(capsys):
    bench_compile.main(["--gpu_mfu", "--device=cpu", *FAST])
    out = capsys.readouterr().out
    assert "labels on the fly" in out and "MFU" in out and "chunks of 1024 rows" in out


def test_compile_cli():
    """bench_compile.py takes bench.py's shared options and exactly one of its modes; bench.py no
    longer has them."""
    args = bench_compile.parse(["--check", "--tiny", "--backend=aot_eager"])
    assert (args.check, args.gpu_mfu, args.backend, args.n_embd, args.batch_size) == (
        True,
        False,
        "aot_eager",
        64,
        2,
    )
    # the CUDA run's defaults
    assert bench_compile.parse(["--gpu_mfu", "--device=cuda"]).batch_size == 16
    for argv in ([], ["--check", "--gpu_mfu"]):
        with pytest.raises(SystemExit):
            bench_compile.parse(argv)
    for flag in ("--gpu_mfu", "--compile_check", "--lm_chunk=4096"):
        with pytest.raises(SystemExit):
            bench.parse([flag])


def test_cocomix_student_is_one_graph(capsys):
    """Dynamo traces the CoCoMix student's forward + loss (sparse mixing is a plain embedding_bag)
    as one graph; the full compiled run is `bench_compile.py --check`."""
    args = bench.parse(["--tiny"])
    X, Y = bench.batch(args, "cpu")
    model = bench.student(args, "cocomix", "cpu")
    labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr))
    ex = bench_compile.explain(bench.student_loss, model, X, Y, labels)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), capsys.readouterr().out


def test_split(capsys):
    # that the staged step computes train_step's loss and gradients: test_staged_step_is_train_step
    bench.main(["--split", "--mode=cocomix", "--dtypes=float32", *FAST])
    out = capsys.readouterr().out
    assert "concept head, TopK + concept loss" in out and "whole step, unstaged" in out


def test_bars(capsys):
    bench.main(["--bars", "--dtypes=float32", *FAST])
    out = capsys.readouterr().out
    assert "labels / source training step" in out and "peak memory" in out


def test_stage_flops_add_up():
    for mix in ("interleave", "add", "none"):
        m = GPT(
            GPTConfig(
                n_layer=3,
                n_head=2,
                n_embd=32,
                block_size=16,
                vocab_size=100,
                n_concepts=64,
                concept_topk=4,
                insert_layer=1,
                mix=mix,
            )
        )
        assert math.isclose(sum(flops.stage_flops(m, 16).values()), flops.flops_per_token(m, 16))


class GradRecorder:
    """An optimizer that only keeps the gradients it is given to apply (after train_step's
    clipping)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {
            n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None
        }

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize(
    "mode,mix,dtype,labels",
    [
        ("cocomix", "interleave", "float32", "cached"),
        ("cocomix", "add", "float32", "cached"),
        ("cocomix", "none", "float32", "cached"),
        ("ntp", "interleave", "float32", None),
        ("cocomix", "interleave", "float32", "on the fly"),
        ("cocomix", "interleave", "bfloat16", "on the fly"),
    ],
)
def test_staged_step_is_train_step(mode, mix, dtype, labels):
    """The staged step (--split) is train_step cut into stages at detached tensors: the same loss
    and the same gradients at the optimizer (to rtol of the largest; bf16 sums some gradient terms
    in another order, a missing term would be far off)."""
    args = bench.parse(["--tiny", f"--mix={mix}"])
    X, Y = bench.batch(args, "cpu")
    model = bench.student(args, mode, "cpu")
    if labels == "cached":
        labels = torch.randint(
            0, args.n_concepts, (*X.shape, args.k_attr), generator=torch.Generator().manual_seed(0)
        )
    elif labels == "on the fly":
        labels = bench.bench_labeler(args, "cpu")
    ctx, rtol = bench.autocast("cpu", dtype), 1e-5 if dtype == "float32" else 3e-2
    whole, staged = GradRecorder(model), GradRecorder(model)
    ref = bench.train_step(model, whole, X, Y, ctx, labels, 0.1)()
    loss = bench.staged_step(model, staged, X, Y, ctx, labels, 0.1)[1]
    assert math.isclose(loss.item(), ref.item(), rel_tol=min(rtol, 1e-3))
    assert whole.grads.keys() == staged.grads.keys()
    assert ("mixer.W_cmp_T" in whole.grads) == (mode == "cocomix" and mix != "none")
    for n, g in whole.grads.items():
        assert (staged.grads[n] - g).abs().max().item() <= rtol * g.abs().max().item() + 1e-7, n


def test_flops_and_mfu(monkeypatch):
    """flops_per_token's numbers are those GPT.flops_per_token gave before it moved to
    cocomix/flops.py; the peak of the GPU by its longest matching name ("L4" is in "NVIDIA L40S"
    too)."""
    gpt2 = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024))
    # 6 x (12 blocks of 12 d^2 + the d x V head) + causal attention, 6 x d x T per block
    assert (
        flops.flops_per_token(gpt2, 1024)
        == 6 * (12 * 12 * 768**2 + 768 * 50257) + 12 * 6 * 768 * 1024
        == 797815296
    )
    # counted by hand for this configuration; mix='none' has no compression (6 K d fewer FLOPs)
    before = {"interleave": 428544, "add": 262656, "none": 261888, "pause": 415488}
    for mix, expected in before.items():
        kind = dict(pause=True) if mix == "pause" else dict(mix=mix, n_concepts=64, concept_topk=4)
        m = GPT(
            GPTConfig(
                n_layer=3,
                n_head=2,
                n_embd=32,
                block_size=16,
                vocab_size=100,
                insert_layer=1,
                **kind,
            )
        )
        assert flops.flops_per_token(m, 16) == expected, mix
    assert (
        flops.device_peak_flops("cpu") == flops.device_peak_flops() == flops.CPU_PEAK_FLOPS == 1e12
    )
    assert flops.PEAK_FLOPS["H100"] == 989e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA H200", 989e12),
        ("Some New GPU", 100e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert flops.device_peak_flops("cuda") == peak, name
    coco = GPT(
        GPTConfig(
            n_layer=4,
            n_head=2,
            n_embd=64,
            block_size=32,
            n_concepts=256,
            concept_topk=8,
            insert_layer=1,
        )
    )
    assert math.isclose(flops.estimate_mfu(coco, 64, 32, 0.5, "cpu"), 21624192 * 64 / 0.5 / 1e12)


def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu_check.sh's check at smoke-test size on the CPU: every part runs, and its figures
    say what they should (the ops equal their references, the compiled student equals eager, no
    graph break), and the last part, the comparison, runs reproduce.py's tiny preset to its table.
    """
    import json
    import os
    import subprocess

    root = ROOT
    offline_text = os.path.join(os.environ.get("COCOMIX_DATA", ""), "tinyshakespeare", "input.txt")
    # else the tiny preset would download its text: part 4 skipped
    comparing = os.path.isfile(offline_text)
    p = subprocess.run(
        [
            "bash",
            os.path.join(root, "scripts", "gpu_check.sh"),
            "--dry_run",
            f"--minutes={5 if comparing else 0}",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.load(open(tmp_path / "gpu_check.json"))
    assert not [k for k, v in r.items() if isinstance(v, dict) and "FAILED" in v]
    ops = r["1 ops on the device"]
    assert max(ops["sparse_mix fp32: output, grad values, grad W (rel. diff)"]) < 1e-5
    assert max(ops["lm_loss float32: grad x, grad W vs float64 full logits (rel. diff)"]) < 1e-5
    assert max(ops["lm_loss float16: grad x, grad W vs float64 full logits (rel. diff)"]) < 2e-3
    eager, compiled, grad_diff = r["2 compiled vs eager"][
        "compiled cocomix: loss eager, loss compiled, max grad rel. diff"
    ]
    assert abs(eager - compiled) < 1e-4 and grad_diff < 1e-4
    assert r["2 graph breaks and recompiles"]["cocomix"]["graph_breaks"] == 0
    assert r["3 MFU"]["cocomix 2L d=64, cached labels"]["tokens_per_s"] > 0
    assert "gpu_check.md" in os.listdir(tmp_path)
    if comparing:  # the tiny preset's NTP and CoCoMix, end to end (~35 s here)
        comparison = r["4 comparison"]
        assert comparison["returncode"] == 0 and "results:" in comparison["tail"], comparison
        assert sorted(os.listdir(tmp_path / "reproduce_tiny" / "runs")) == ["cocomix_s1", "ntp_s1"]


def test_gpu_check_stops_at_its_deadline(tmp_path):
    """gpu_check's last part runs reproduce.py until the check's deadline: then SIGTERM, so the
    running stage saves (reproduce.py passes it on), and SIGKILL only if the command outlives the
    grace period."""
    import importlib.util
    import os
    import sys
    import time

    root = ROOT
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(root, "scripts", "gpu_check.py")
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    saved = tmp_path / "saved"
    polite = (
        "import signal, sys, time\ndef stop(*_):\n    open(sys.argv[1], 'w').write('checkpoint'); "
        "print('saved', flush=True); sys.exit(3)\nsignal.signal(signal.SIGTERM, "
        "stop)\nprint('training', flush=True)\ntime.sleep(60)\n"
    )

    def started_run(cmd, first, **kw):
        # bounded retry: on a loaded machine the deadline may pass before the child has set its
        # handler (then it has not printed its first line, and the run shows nothing)
        for _ in range(3):
            rc, out = gpu_check.run_until(cmd, **kw)
            if out.startswith(first):
                break
        return rc, out

    rc, out = started_run(
        [sys.executable, "-c", polite, str(saved)], "training", seconds=4, grace=20
    )
    assert rc is None and saved.read_text() == "checkpoint" and out.split() == ["training", "saved"]
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('busy', flush=True)\ntime.sleep(60)\n"
    )
    t0 = time.time()  # 20 s: far above the 3 s a try takes, below the 60 s a lost SIGKILL waits
    rc, out = started_run([sys.executable, "-c", stubborn], "busy", seconds=2, grace=1)
    assert rc is None and out.strip() == "busy" and time.time() - t0 < 20
    assert gpu_check.run_until(
        [sys.executable, "-c", "print('done'); raise SystemExit(4)"], seconds=30
    ) == (4, "done\n")


def test_vs_nanogpt(tmp_path, capsys):
    """bench.py --vs_nanogpt's plumbing, with a stand-in for nanoGPT's model.py (nanoGPT's
    interface: GPT, GPTConfig, forward(idx, targets) -> (logits, loss), configure_optimizers): same
    weights, so the first losses agree exactly in fp32; a missing checkout is a one-line error."""
    root = ROOT
    (tmp_path / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {root!r})\nfrom model import GPT, GPTConfig\n"
    )
    bench.main(["--vs_nanogpt", str(tmp_path), "--dtypes=float32,float32", *FAST])
    out = capsys.readouterr().out
    # from the initial weights for every dtype: the second check used to compare models trained by
    # the first
    assert (
        out.count("first loss ours - nanoGPT's: 0.0e+00") == 2
        and out.count("against its padded vocabulary") == 2
        and "nanoGPT 50304" in out
        and "parameter-matched ntp" in out
        and out.count("as each repository runs by default") == 2
    )
    with pytest.raises(SystemExit, match="no nanoGPT model.py"):
        bench.main(["--vs_nanogpt", str(tmp_path / "nowhere"), *FAST])
    # it was ignored: eager steps timed
    with pytest.raises(SystemExit, match="--compile does not apply"):
        bench.main(["--vs_nanogpt", str(tmp_path), "--compile", *FAST])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_page_faults():
    """train.py's cpu_heap (cocomix/runtime.py, keep_freed_memory): once a step-like cycle of
    200-300 MB tensors has run, later cycles mostly reuse the heap's pages. With glibc's defaults
    every cycle maps and page-faults its tensors afresh (~200,000 minor faults each). Counted in
    fresh processes, one per setting."""
    code = """
import resource, sys, torch
from cocomix.runtime import keep_freed_memory
if sys.argv[1] == "heap":
    assert keep_freed_memory()
x, faults = torch.randn(1024, 1024), []
for i in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = x.repeat(64 + 16 * (i % 3), 1)  # 256-384 MB, then as much again
    b = a * 2
    (a + b).sum()
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-6:]))
"""
    n = {
        m: int(
            subprocess.run(
                [sys.executable, "-c", code, m],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for m in ("default", "heap")
    }
    # the heap still grows now and then
    assert n["default"] > 600_000 and n["heap"] < n["default"] / 5, n


def test_keep_freed_memory_elsewhere_does_nothing(monkeypatch):
    """Without glibc (macOS, Windows, musl) there is no setting to make: False, no error."""
    import ctypes

    import cocomix.runtime as runtime

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert runtime.keep_freed_memory() is False
    monkeypatch.undo()
    assert runtime.keep_freed_memory("cuda:0") is False  # a GPU's tensors are not glibc's
