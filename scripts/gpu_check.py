"""
The prepared GPU check: one command on a fresh one-GPU machine, no network, about 6 minutes on an
H100 (each part's budget is printed at the start).

    bash scripts/gpu_check.sh
    # the budget of the real run, then everything at smoke-test size on the CPU
    bash scripts/gpu_check.sh --dry_run
    # then reproduce.py's `cpu` comparison for M minutes (needs the data folder: COCOMIX_DATA)
    bash scripts/gpu_check.sh --compare_minutes=M

In order, each part's figures going into OUT/gpu_check.json and OUT/gpu_check.md as it finishes,
so that a run stopped early keeps the parts done:
 1. training: train.py itself, a few hundred steps of the paper's 69M CoCoMix student
    (config/gpu_69m_cocomix.py), compiled, bf16, the concept labels made on the device each step
    from a random concept source and SAE (written with random tokens to OUT/train/): steps/s,
    tokens/s, MFU, peak memory, and whether the loss went down;
 2. the ops on the device: sparse mixing and the LM-head loss (fp32, bf16, fp16, KD) against
    their float64 references (cocomix/ops.py), the references made a chunk of rows at a time;
 3. the concept labels made on the device against the same labels made on the CPU;
 4. label_fill='released': the zero-score order against torch.topk on the device;
 5. the compiled CoCoMix student (inductor) against eager: loss and every parameter gradient;
 6. bench_compile.py's graph-break and recompile check, NTP and CoCoMix (aot_eager: the graphs
    are dynamo's, whichever backend);
 7. MFU of GPT-2 124M NTP, bf16, fused AdamW, compiled and eager in turns (bench_compile.py
    --gpu_mfu): what compile gains on this GPU.
On a GPU each part also records its peak device memory (torch.cuda.max_memory_allocated).
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

import scripts.bench_compile as bench_compile
from cocomix.flops import PEAK_FLOPS, device_peak_flops, flops_per_token, label_flops
from scripts.gpu_check_ops import (
    OPS,
    check_compiled,
    check_labels,
    check_ops,
    check_topk_order,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# the sizes of the real run, and its budget

# part 1: the student of config/gpu_69m_cocomix.py at this micro-batch, for this many steps, with
# a random concept source of this size and a random SAE of the preset's C = 32768 latents, k = 32
TRAIN = dict(steps=300, batch_size=16, eval_interval=100, eval_iters=5)
SOURCE = dict(n_layer=4, n_head=4, n_embd=256, block_size=1024)
SAE_SHAPE = dict(n_latents=32768, k=32, layer=1)
# The budget's basis. Work: FLOPs (cocomix/flops.py) at 25% of the H100's dense bf16 peak, and for
# float64 at 25% of its 67 TFLOP/s: below the 30-40% a compiled GPT of these widths reaches, so
# conservative. Compile: assumed (nothing here can measure a GPU compile), inductor with a cold
# cache on a 16-core host: 60 s for the training graph of an 8- or 12-layer student, 45 s for a
# 4-layer one, 20 s for a forward-only (evaluation) graph; aot_eager's dynamo + AOT trace 6 s a
# graph. Fixed: start-up (imports, CUDA context, model builds) as listed per part.
H100 = PEAK_FLOPS["H100"]
RATE, RATE_FP64 = 0.25 * H100, 0.25 * 67e12
COMPILE_8L, COMPILE_4L, COMPILE_EVAL, TRACE_AOT = 60, 45, 20, 6


def student_config(**over):
    """The 69M CoCoMix student of config/gpu_69m_cocomix.py (its model settings, read from the
    file), with `over` changed."""
    from model import GPTConfig

    cfg = {}
    exec(open(os.path.join(REPO, "config", "gpu_69m_cocomix.py")).read(), {}, cfg)
    keys = ("n_layer", "n_head", "n_embd", "block_size", "insert_layer", "concept_topk", "dropout")
    cfg = {k: cfg[k] for k in keys} | dict(n_concepts=SAE_SHAPE["n_latents"], mix="interleave")
    return GPTConfig(**cfg | over)


def train_flops_per_token():
    """(student, labels) training FLOPs per token of part 1."""
    from model import GPTConfig

    cfg = student_config()
    src = GPTConfig(**SOURCE)
    labeler = SimpleNamespace(
        source=SimpleNamespace(config=src),
        sae=SimpleNamespace(n_latents=SAE_SHAPE["n_latents"], k=SAE_SHAPE["k"]),
        layer=SAE_SHAPE["layer"],
    )
    T = cfg.block_size
    return (
        flops_per_token(SimpleNamespace(config=cfg), T),
        sum(label_flops(labeler, T).values()),
    )


def budget():
    """Seconds per part of the real run on one H100, by the basis above."""
    from model import GPTConfig

    f_student, f_labels = train_flops_per_token()
    T = student_config().block_size
    train_tokens = TRAIN["steps"] * TRAIN["batch_size"] * T
    eval_tokens = (TRAIN["steps"] // TRAIN["eval_interval"] + 1) * 2 * TRAIN["eval_iters"]
    eval_tokens *= TRAIN["batch_size"] * T
    o = OPS
    # fwd + bwd of the N x V logits: 6 N V d, once per reference (plain, KD), 6 fast runs
    lm = 6 * o["N"] * o["V"] * o["d"]
    gpt2 = flops_per_token(SimpleNamespace(config=GPTConfig(n_layer=12, n_head=12, n_embd=768)), T)
    # gpu_mfu: warm-up, 3 rounds x 10 steps, the first and peak steps; compiled, and eager at
    # half the rate
    mfu_tokens = 3 * (3 + 3 * 10 + 2) * 16 * T
    return {
        "1 training (train.py, 69M CoCoMix)": 15
        + COMPILE_8L
        + COMPILE_EVAL
        + train_tokens * (f_student + f_labels) / RATE
        + eval_tokens * (f_student + f_labels) / 3 / RATE,
        "2 ops on the device": 10 + 2 * lm / RATE_FP64 + 6 * lm / RATE,
        "3 labels, device vs CPU": 10,
        "4 released fill, zero-score order": 5,
        "5 compiled vs eager": 5 + COMPILE_4L,
        "6 graph breaks and recompiles": 10 + 6 * TRACE_AOT,
        "7 MFU, GPT-2 124M, compiled and eager": 10 + COMPILE_8L + mfu_tokens * gpt2 / RATE,
    }


# -----------------------------------------------------------------------------
# the parts


def floats(x):
    """Tensors in a part's result as Python floats, for the JSON."""
    if isinstance(x, dict):
        return {k: floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [floats(v) for v in x]
    return x.item() if isinstance(x, torch.Tensor) else x


def write_train_inputs(root, small):
    """Part 1's inputs in root: random token files (a 512-token vocabulary, so that the loss has
    somewhere to go from log 50257), a random concept source saved as train.py saves checkpoints,
    and a random SAE on its block SAE_SHAPE['layer']. Returns (data_dir, source path, SAE path)."""
    from cocomix.weights import save_atomic
    from model import GPT, GPTConfig
    from sae import SAE

    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = rng.choice(50257, 512, replace=False).astype(np.uint16)
    sizes = {"train": 20_000, "val": 5_000} if small else {"train": 2_000_000, "val": 200_000}
    for split, n in sizes.items():
        vocab[rng.integers(0, len(vocab), n)].tofile(os.path.join(data, f"{split}.bin"))
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_token": 50256,
        "dtype": "uint16",
        "splits": {s: {"tokens": n} for s, n in sizes.items()},
    }
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump(meta, f)
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=64) if small else SOURCE
    cfg = GPTConfig(**shape)
    source = os.path.join(root, "source.pt")
    save_atomic({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}, source)
    sae_path = os.path.join(root, "sae.pt")
    n_latents, k = (256, 8) if small else (SAE_SHAPE["n_latents"], SAE_SHAPE["k"])
    SAE(cfg.n_embd, n_latents, k, meta={"layer": SAE_SHAPE["layer"]}).save(sae_path)
    return data, source, sae_path


# train.py run in this process's child, its peak device memory printed at exit
PEAK_HOOK = (
    "import atexit, runpy, sys, torch\n"
    "atexit.register(lambda: print('PEAK_BYTES', torch.cuda.max_memory_allocated() "
    "if torch.cuda.is_available() else 0, flush=True))\n"
    "sys.argv = ['train.py', *sys.argv[1:]]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


def check_training(dev, small, out_dir):
    """train.py on the device (module docstring, part 1). steps/s from the log's clock between the
    first and the last evaluation after step 0 (the compiles are before it; one evaluation of
    2 x eval_iters batches lies within it, left in). MFU: the student's and the labels' FLOPs
    (cocomix/flops.py) over the device's dense bf16 peak."""
    root = os.path.join(out_dir, "train")
    data, source, sae_path = write_train_inputs(root, small)
    steps = 6 if small else TRAIN["steps"]
    eval_interval = 3 if small else TRAIN["eval_interval"]
    flags = [
        "config/gpu_69m_cocomix.py",
        f"--data_dir={data}",
        f"--out_dir={os.path.join(root, 'out')}",
        f"--concept_source={source}",
        f"--sae_path={sae_path}",
        f"--sae_layer={SAE_SHAPE['layer']}",
        f"--max_iters={steps}",
        f"--eval_interval={eval_interval}",
        f"--eval_iters={2 if small else TRAIN['eval_iters']}",
        f"--batch_size={2 if small else TRAIN['batch_size']}",
        "--gradient_accumulation_steps=1",
        f"--warmup_iters={2 if small else 30}",
        "--learning_rate=1e-3",
        "--log_interval=1",
        "--label_cache=False",  # labels made on the device every step
        "--dtype=bfloat16",
        f"--device={dev}",
        "--progress=False",
        "--init_from=scratch",
    ]
    if small:  # a student of smoke-test size, eager (a CPU compile takes minutes)
        flags += [
            "--n_layer=2",
            "--n_head=2",
            "--n_embd=32",
            "--block_size=32",
            "--insert_layer=1",
            "--compile=False",
        ]
    shutil.rmtree(os.path.join(root, "out"), ignore_errors=True)  # a rerun starts afresh
    # the whole run's time limit: twice its budget, or 5 minutes at smoke-test size
    limit = 300 if small else 2 * budget()["1 training (train.py, 69M CoCoMix)"]
    env = dict(os.environ)
    if not env.get("TIKTOKEN_CACHE_DIR"):
        # no tokenizer files: train.py's download of them (for bits per byte) is refused at once
        # instead of waiting on a network an offline machine does not answer
        env["HTTPS_PROXY"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"
    rc, output = run_until([sys.executable, "-c", PEAK_HOOK, *flags], limit, env=env)
    if rc != 0:
        tail = [line for line in output.splitlines() if line.strip() and "PEAK_BYTES" not in line]
        tail = tail[-1:] or ["no output"]
        raise RuntimeError(f"train.py exited with {rc}: {tail[0][:300]}")
    with open(os.path.join(root, "out", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    evals = [r for r in log if "val/loss" in r]
    losses = [r["loss"] for r in log if "train_step" in r]
    a, b = evals[1], evals[-1]
    steps_per_s = (b["iter"] - a["iter"]) / (b["time"] - a["time"])
    T, B = (32, 2) if small else (student_config().block_size, TRAIN["batch_size"])
    f_student, f_labels = train_flops_per_token()
    peak = device_peak_flops(dev)
    tokens_per_s = steps_per_s * B * T
    peak_bytes = [int(line.split()[1]) for line in output.splitlines() if line[:10] == "PEAK_BYTES"]
    res = {
        "command": "python train.py " + " ".join(flags),
        "steps": steps,
        "first compiled step + first evaluation, s": a["time"],
        "steps/s (after the compiles)": steps_per_s,
        "tokens/s": tokens_per_s,
        "MFU, student": f_student * tokens_per_s / peak,
        "MFU, student + labels": (f_student + f_labels) * tokens_per_s / peak,
        "peak GiB (torch.cuda.max_memory_allocated)": (peak_bytes or [0])[0] / 2**30,
        "train loss, first and last logged step": [losses[0], losses[-1]],
        "val loss at step 0 and at the end": [evals[0]["val/loss"], b["val/loss"]],
    }
    if small:  # part 1's FLOPs are the real run's: a smoke-test student has no MFU to speak of
        res["MFU, student"] = res["MFU, student + labels"] = None
    if not b["val/loss"] < evals[0]["val/loss"]:
        raise RuntimeError(f"the loss did not go down: {res}")
    return res


def run_until(cmd, seconds, grace=30, env=None):
    """Runs cmd from the repo root until it ends or `seconds` pass, then stops it with SIGTERM,
    which reproduce.py passes on to its running stage (train.py and sae.py save a checkpoint and
    exit, so a rerun resumes there), and with SIGKILL if it is still running `grace` seconds later.
    Returns (exit status, or None if stopped at the deadline; the output, stdout and stderr
    together)."""
    # a file, not a pipe: a long output cannot block the child
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            rc = None
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def comparison(out_dir, data_root, minutes, small):
    """reproduce.py's `cpu` comparison (its own concept source and SAE, trained here on Gutenberg)
    at 4x its steps, NTP and CoCoMix, stopped after `minutes` with SIGTERM, so that the running
    stage saves (its stages resume: rerun the same command to go on)."""
    preset = "tiny" if small else "cpu"
    cmd = [
        sys.executable,
        "reproduce.py",
        f"--preset={preset}",
        f"--out_dir={os.path.join(out_dir, 'reproduce_' + preset)}",
        "--seeds=1",
        "--methods=ntp,cocomix",
        f"--data_root={data_root}",
    ]
    if not small:  # 4x the CPU comparison's longest runs: 9.4M tokens
        cmd += ["--set", "max_iters=2304", "eval_interval=288"]
    t0 = time.time()
    rc, output = run_until(cmd, 60 * minutes, grace=30)
    res = {"command": " ".join(cmd[1:]), "returncode": rc, "tail": output[-4000:]}
    if rc is None:
        res["stopped"] = (
            f"after {time.time() - t0:.0f} s, its running stage saved; rerun the check (or the "
            "command) to go on from there"
        )
    elif rc != 0:
        raise RuntimeError(f"reproduce.py exited with {rc}: {output.strip()[-300:]}")
    return res


# -----------------------------------------------------------------------------
# the run: every part in turn, saved after each


def markdown(results):
    lines = ["| part | figure | value |", "|---|---|---|"]
    for part, figures in results.items():
        for k, v in figures.items() if isinstance(figures, dict) else [("", figures)]:
            v = json.dumps(v, default=str)
            lines.append(f"| {part} | {k} | {v[:300]} |")
    return "\n".join(lines) + "\n"


def save(results, out_dir):
    """gpu_check.json and gpu_check.md, each written whole to a temporary file and renamed, so a
    kill mid-write keeps the previous one."""
    for name, text in (
        ("gpu_check.json", json.dumps(results, indent=1, default=str)),
        ("gpu_check.md", markdown(results)),
    ):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def run_parts(parts, results, out_dir, cuda=False):
    """Runs each part (name: fn) in turn; a failing part is a finding and the others still run.
    After each: its seconds (and peak device memory on a GPU) go into results, which are saved,
    and one line is printed. Returns True if every part passed."""
    ok = True
    for name, fn in parts.items():
        t0 = time.time()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            res, status = floats(fn()), "ok"
        except Exception as e:
            ok, status = False, "FAILED"
            res = {
                "FAILED": f"{type(e).__name__}: {e}"[:500],
                "traceback": traceback.format_exc()[-1500:],
            }
        res = res if isinstance(res, dict) else {"result": res}
        res["seconds"] = round(time.time() - t0, 1)
        if cuda:
            res["peak GiB (this process)"] = torch.cuda.max_memory_allocated() / 2**30
        results[name] = res
        save(results, out_dir)
        print(f"== {name}: {status}, {res['seconds']:.0f} s", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry_run", action="store_true", help="smoke-test sizes, CPU if there is no GPU"
    )
    p.add_argument(
        "--compare_minutes",
        type=float,
        default=0.0,
        help="after the check, reproduce.py's cpu comparison for this long (not in the budget)",
    )
    p.add_argument(
        "--data_root",
        default=os.environ.get("COCOMIX_DATA", ""),
        help="--compare_minutes's data: holds gutenberg/ (default: $COCOMIX_DATA)",
    )
    p.add_argument("--out_dir", default="out/gpu_check")
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.dry_run:
        sys.exit("error: no GPU here; --dry_run runs the check at smoke-test size on the CPU")
    if a.compare_minutes and not a.data_root:
        sys.exit("error: --compare_minutes needs the data folder: set COCOMIX_DATA or --data_root")
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        print("note: TIKTOKEN_CACHE_DIR is not set: part 1's train.py logs no bits per byte")
    os.makedirs(a.out_dir, exist_ok=True)
    small = a.dry_run
    plan = budget()
    total = sum(plan.values())
    print("budget of the real run on one H100 (FLOPs at 25% MFU + assumed compile times):")
    for name, s in plan.items():
        print(f"  {name:<40} {s:>5.0f} s")
    print(f"  {'total':<40} {total:>5.0f} s = {total / 60:.1f} min", flush=True)
    if small:
        print("dry run: every part at smoke-test size on this machine's", dev)
    results = {
        "machine": {
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "dry_run": a.dry_run,
            "budget s (real run, one H100)": {**plan, "total": total},
        }
    }
    save(results, a.out_dir)
    fast = ["--tiny", "--rounds=1", "--warmup=0", "--steps=1"] if small else []
    parts = {
        "1 training (train.py, 69M CoCoMix)": lambda: check_training(dev, small, a.out_dir),
        "2 ops on the device": lambda: check_ops(dev, small),
        "3 labels, device vs CPU": lambda: check_labels(dev, small),
        "4 released fill, zero-score order": lambda: check_topk_order(dev),
        "5 compiled vs eager": lambda: check_compiled(dev, small),
        "6 graph breaks and recompiles": lambda: bench_compile.compile_check(
            bench_compile.parse(["--check", f"--device={dev}", *fast, "--backend=aot_eager"])
        ),
        "7 MFU, GPT-2 124M, compiled and eager": lambda: bench_compile.gpu_mfu(
            bench_compile.parse(["--gpu_mfu", f"--device={dev}", "--variants=ntp,ntp_eager", *fast])
        ),
    }
    if a.compare_minutes:
        parts["8 comparison"] = lambda: comparison(a.out_dir, a.data_root, a.compare_minutes, small)
    ok = run_parts(parts, results, a.out_dir, cuda=dev == "cuda")
    print(markdown(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
