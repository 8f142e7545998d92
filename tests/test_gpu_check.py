"""scripts/gpu_check.py, the prepared one-GPU check: its dry run end to end, its budget, the
results kept part by part, and its largest parts' device memory at the GPU run's sizes, traced on
fake tensors (cocomix/memory.py)."""

import functools
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import scripts.gpu_check as gpu_check
import scripts.gpu_check_ops as gpu_check_ops
from cocomix.memory import fake_tensors, traced_peak
from cocomix.ops import default_lm_chunk, lm_loss, lm_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def test_dry_run(tmp_path):
    """`bash scripts/gpu_check.sh --dry_run`: the real run's budget (at most 6 minutes), then every
    part at smoke-test size on the CPU, one line each, and figures that say what they should."""
    p = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "scripts", "gpu_check.sh"),
            "--dry_run",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    total = [line for line in p.stdout.splitlines() if line.strip().startswith("total")]
    assert len(total) == 1 and float(total[0].split()[1]) <= 360, total
    r = json.load(open(tmp_path / "gpu_check.json"))
    parts = [k for k in r if k != "machine"]
    assert len(parts) == 7 and not [k for k in parts if "FAILED" in r[k]]
    assert [line for line in p.stdout.splitlines() if line.startswith("== ")] == [
        f"== {k}: ok, {r[k]['seconds']:.0f} s" for k in parts
    ]
    train = r["1 training (train.py, 69M CoCoMix)"]
    first, last = train["val loss at step 0 and at the end"]
    assert last < first and train["steps/s (after the compiles)"] > 0
    ops = r["2 ops on the device"]
    assert max(ops["sparse_mix fp32: output, grad values, grad W (rel. diff)"]) < 1e-5
    assert max(ops["lm_loss float32: grad x, grad W vs float64 full logits (rel. diff)"]) < 1e-5
    assert max(ops["lm_loss KD float32: grad x, grad W (rel. diff)"]) < 1e-5
    assert max(ops["lm_loss float16: grad x, grad W vs float64 full logits (rel. diff)"]) < 2e-3
    eager, compiled, grad_diff = r["5 compiled vs eager"][
        "compiled cocomix: loss eager, loss compiled, max grad rel. diff"
    ]
    assert abs(eager - compiled) < 1e-4 and grad_diff < 1e-4
    assert r["6 graph breaks and recompiles"]["cocomix"]["graph_breaks"] == 0
    mfu = r["7 MFU, GPT-2 124M, compiled and eager"]
    assert mfu["ntp 2L d=64"]["tokens_per_s"] > 0 and mfu["ntp 2L d=64, eager"]["tokens_per_s"] > 0
    assert "| 2 ops on the device |" in (tmp_path / "gpu_check.md").read_text()


def test_budget():
    """The real run's budget: at most 6 minutes in all, the training part under 2, one entry per
    part the check runs."""
    plan = gpu_check.budget()
    assert sum(plan.values()) <= 360 and plan["1 training (train.py, 69M CoCoMix)"] < 120
    assert len(plan) == 7 and all(s > 0 for s in plan.values())


def test_results_saved_after_every_part(tmp_path):
    """Each part's result is on disk before the next starts, and a part that raises is recorded
    as failed while the others still run: a check stopped or failing mid-way keeps the rest."""
    path = tmp_path / "gpu_check.json"

    def second():
        assert "first" in json.load(open(path)), "the first part was not saved before the second"
        raise RuntimeError("out of memory")

    results = {"machine": {}}
    parts = {"first": lambda: {"x": torch.tensor(1.5)}, "second": second, "third": lambda: [2]}
    assert not gpu_check.run_parts(parts, results, str(tmp_path))
    r = json.load(open(path))
    assert r["first"]["x"] == 1.5 and r["third"]["result"] == [2]
    assert r["second"]["FAILED"] == "RuntimeError: out of memory"
    assert "| second | FAILED |" in (tmp_path / "gpu_check.md").read_text()


def test_lm_reference_grads_in_chunks():
    """The float64 reference made a chunk of rows at a time has the gradients of the whole one,
    plain and KD (chunks of unequal valid counts)."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (40,), generator=g)
    t[::3], t[1:5] = -1, -1
    teacher = (torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g))
    for kd in (None, teacher):
        xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
        loss = lm_loss_reference(xr, Wr, t, *((kd, 0.1) if kd else ()))
        want = torch.autograd.grad(loss[0] if kd else loss, (xr, Wr))
        got = gpu_check_ops.lm_reference_grads(x, W, t, kd, 0.1, rows=16)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.to(a.dtype))  # in x and W's fp32


@pytest.mark.parametrize("part", ["ops", "training step"])
def test_largest_parts_fit_40_gib(part):
    """The device memory of the check's largest parts at the sizes of the GPU run, traced on fake
    CPU tensors (nothing allocated), with the LM-head chunk CUDA uses: the ops part (its float64
    references in chunks) and one bf16
    step of part 1's student (69M CoCoMix, micro-batch 16 x 1024, labels from part 1's random
    source and SAE, AdamW). Each under 40 GiB."""
    from model import GPT, GPTConfig, training_loss
    from sae import SAE, ConceptLabeler

    chunk = default_lm_chunk("cuda")
    t0 = time.time()
    with fake_tensors():
        if part == "ops":
            peak, kinds = traced_peak(
                functools.partial(gpu_check_ops.check_ops, "cpu", False, chunk)
            )
        else:
            # the labels first, outside the trace (MemTracker cannot hook the frozen source's
            # outputs): their pass ends before the student's forward, and frees what it made
            source = GPT(GPTConfig(**gpu_check.SOURCE)).eval().requires_grad_(False)
            s = gpu_check.SAE_SHAPE
            sae = SAE(source.config.n_embd, s["n_latents"], s["k"], {"layer": s["layer"]})
            X = torch.randint(0, 50257, (gpu_check.TRAIN["batch_size"], 1024))
            with torch.autocast("cpu", torch.bfloat16):
                labels = ConceptLabeler(source, sae, s["layer"], 4)(X, X)
            # dropout 0: CUDA's flash attention keeps O(T) a row with dropout too, but a CPU's
            # attention with dropout takes the math path, which keeps the T x T scores
            model = GPT(gpu_check.student_config(dropout=0.0))
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
            head = functools.partial(lm_loss, chunk=chunk)

            def step():
                with torch.autocast("cpu", torch.bfloat16):
                    loss = training_loss(
                        model, X, X, "cocomix", labels, None, 0.1, 0.1, head_loss=head
                    )[0]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

            peak, kinds = traced_peak(step, model, opt)
    print(
        f"{part}: peak {peak / GiB:.2f} GiB "
        f"({', '.join(f'{k} {v / GiB:.2f}' for k, v in kinds.items() if v)}), "
        f"traced in {time.time() - t0:.0f} s"
    )
    assert 1 * GiB < peak < 40 * GiB, peak / GiB


def test_stops_at_its_deadline(tmp_path):
    """run_until (the optional comparison, and part 1's train.py): at the deadline SIGTERM, so the
    running stage saves (reproduce.py passes it on), and SIGKILL only if the command outlives the
    grace period."""
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


def test_no_path_outside_the_repository():
    """The shell entry point names no folder beside the repository: a tokenizer cache or a data
    folder comes from the environment."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    assert ".." not in text.replace('$(dirname "$0")/..', "") and "shared" not in text


def test_comparison_needs_its_data(monkeypatch, tmp_path):
    """--compare_minutes without a data folder: a one-line error naming COCOMIX_DATA."""
    monkeypatch.delenv("COCOMIX_DATA", raising=False)
    with pytest.raises(SystemExit, match="set COCOMIX_DATA or --data_root"):
        gpu_check.main(["--dry_run", "--compare_minutes=1", f"--out_dir={tmp_path}"])
