"""bench.py's and bench_compile.py's modes at smoke-test size, so that the scripts meant for other machines
(--gpu_mfu) or for later (--split, --bars) do not rot. One step each, no timing claims."""

import math

import pytest
import torch

import bench
import bench_compile
from model import GPT, GPTConfig

FAST = ["--tiny", "--rounds=1", "--warmup=0", "--steps=1"]


def test_gpu_mfu_cpu_path(capsys):
    bench_compile.main(["--gpu_mfu", "--device=cpu", *FAST])
    out = capsys.readouterr().out
    assert "labels on the fly" in out and "MFU" in out and "chunks of 256 rows" in out


def test_compile_cli():
    """bench_compile.py takes bench.py's shared options and exactly one of its modes; bench.py no longer
    has them."""
    args = bench_compile.parse(["--check", "--tiny", "--backend=aot_eager"])
    assert (args.check, args.gpu_mfu, args.backend, args.n_embd, args.batch_size) == (True, False, "aot_eager", 64, 2)
    assert bench_compile.parse(["--gpu_mfu", "--device=cuda"]).batch_size == 16  # the CUDA run's defaults
    for argv in ([], ["--check", "--gpu_mfu"]):
        with pytest.raises(SystemExit):
            bench_compile.parse(argv)
    for flag in ("--gpu_mfu", "--compile_check", "--lm_chunk=4096"):
        with pytest.raises(SystemExit):
            bench.parse([flag])


def test_cocomix_student_is_one_graph(capsys):
    """SparseMix's backward is a custom op, so dynamo traces the CoCoMix student's forward + loss (and the
    Function's backward with it) as one graph; the full compiled run is `bench_compile.py --check`."""
    args = bench.parse(["--tiny"])
    X, Y = bench.batch(args, "cpu")
    model = bench.student(args, "cocomix", "cpu")
    labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr))
    ex = bench_compile.explain(model, X, Y, concept_labels=labels, return_logits=False)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), capsys.readouterr().out


def test_split_matches_the_model(capsys):
    # bench_split first checks the staged step's loss and gradients against GPT.forward
    bench.main(["--split", "--mode=cocomix", "--dtypes=float32", *FAST])
    out = capsys.readouterr().out
    assert "concept head + concept loss" in out and "whole step, unstaged" in out


def test_bars(capsys):
    bench.main(["--bars", "--dtypes=float32", *FAST])
    out = capsys.readouterr().out
    assert "labels / source training step" in out and "peak memory" in out


def test_stage_flops_add_up():
    for mix in ("interleave", "add", "none"):
        m = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=100, n_concepts=64,
                          concept_topk=4, insert_layer=1, mix=mix))
        assert math.isclose(sum(bench.stage_flops(m, 16).values()), m.flops_per_token(16))


def test_stages_cut_exactly():
    """Cutting the graph at detached tensors changes nothing: same gradients as one backward."""
    for mix in ("interleave", "add", "none"):
        args = bench.parse(["--tiny", f"--mix={mix}"])
        X, Y = bench.batch(args, "cpu")
        model = bench.student(args, "cocomix", "cpu")
        labels = torch.randint(0, args.n_concepts, (*X.shape, args.k_attr))
        bench.check_stages(model, X, Y, bench.autocast("cpu", "float32"), labels, 0.1, rtol=1e-5)
