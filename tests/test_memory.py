"""Device memory known before the first step: every config/gpu_* preset's full-size step traced on
fake tensors as on CUDA (scripts/trace_memory.py), against the estimate train.py checks
(cocomix/memory.py, step_memory); the check itself with a GPU's free memory mocked; the ops on the
meta device."""

import glob
import os

import pytest
import torch

from cocomix import ops
from cocomix.checks import CUDA_SLACK, check_memory
from cocomix.memory import as_on_cuda, largest_batch, step_memory
from cocomix.ops import fused_concept_head, lm_loss
from model import GPT, GPTConfig, Objective
from scripts.trace_memory import VOCAB, frozen_shapes, preset, trace_step
from tests.fixtures import ROOT

GPU_PRESETS = sorted(glob.glob(os.path.join(ROOT, "config", "gpu_*.py")))
GIB = 2**30


def test_there_are_six_gpu_presets():
    names = [os.path.basename(p)[:-3] for p in GPU_PRESETS]
    assert names == [f"gpu_{s}_{m}" for s in ("1b", "386m", "69m") for m in ("cocomix", "ntp")]


@pytest.mark.parametrize("path", GPU_PRESETS, ids=lambda p: os.path.basename(p)[:-3])
def test_gpu_preset_step_traces_at_full_size(path):
    """One micro-batch (a later one, with the gradients of the earlier ones held) and fused AdamW
    step of the preset at its batch_size, block_size 1024, vocabulary 50,257 and C = 32,768, under
    bf16 autocast, with the concept labeler of a GPT-2-124M-shaped source and a 32k SAE: no shape,
    dtype or missing-gradient error, every trainable parameter a gradient of its shape and dtype,
    and the fake-tensor peak within 20% of train.py's estimate."""
    c = preset(path)
    assert c["block_size"] == 1024 and c["gradient_accumulation_steps"] > 1
    peak, parts, bad = trace_step(c)
    assert bad == []
    assert parts["OPT"] > 0 and parts["GRAD"] > 0  # AdamW's moments and the held gradients
    estimate = step_memory(c, VOCAB, *frozen_shapes(c))
    assert abs(estimate - peak) <= 0.2 * peak, (estimate / GIB, peak / GIB)


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "kd"},
        {"mode": "pause"},
        {"mode": "cocomix", "n_embd": 512, "mix": "add"},
        {"mode": "cocomix", "n_embd": 512, "mix": "none", "dropout": 0.0},
        {"dtype": "float32"},
        {"mode": "cocomix", "n_embd": 512, "dtype": "float16"},
    ],
    ids=lambda change: "-".join(map(str, change.values())),
)
def test_other_objectives_and_precisions_trace_within_the_estimate(change):
    """The estimate's other branches, at the 69M preset's size with 8 windows a micro-batch: KD's
    teacher (GPT-2 124M's shape) and chunk, the pause tokens, CoCoMix's add and prediction-only
    mixing, fp32 and fp16 (whose loss takes an fp32 log-softmax)."""
    c = {**preset(os.path.join(ROOT, "config", "gpu_69m_ntp.py")), "batch_size": 8, **change}
    peak, _, bad = trace_step(c)
    assert bad == []
    estimate = step_memory(c, VOCAB, *frozen_shapes(c))
    assert abs(estimate - peak) <= 0.2 * peak, (estimate / GIB, peak / GIB)


def test_the_trace_takes_the_cuda_chunk():
    """On a CPU trace the LM head's chunk is a GPU's, 4096 rows, and attention drops its dropout
    (CUDA's flash kernel keeps no mask); both are restored after."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert ops.default_lm_chunk("cpu") == 1024
    with as_on_cuda():
        assert ops.default_lm_chunk("cpu") == 4096 and ops.default_lm_chunk("cuda") == 4096
        q = torch.randn(1, 1, 8, 4)
        torch.manual_seed(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        torch.testing.assert_close(out, sdpa(q, q, q))
    assert ops.default_lm_chunk("cpu") == 1024
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


def mock_gpu(monkeypatch, free_gib, reserved_gib=0.0):
    """torch.cuda's free memory and this process's reserved memory, as a GPU would report them."""
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), 80 * GIB)
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved_gib * GIB))


def test_cuda_check_refuses_a_step_that_cannot_fit(monkeypatch):
    """train.py's check on CUDA, the free memory mocked: the 1.38B CoCoMix preset (54 GiB traced)
    runs on an 80 GB card, is refused on 40 GB with the largest batch_size that fits and the
    accumulation that keeps its 1,024 windows a step, and on 16 GB with no batch_size to offer. The
    memory this process holds already (the source and SAE) counts as available."""
    c = preset(os.path.join(ROOT, "config", "gpu_1b_cocomix.py"))
    frozen = frozen_shapes(c)
    args = (VOCAB, "cuda", *frozen)
    need = CUDA_SLACK * step_memory(c, VOCAB, *frozen) / GIB
    mock_gpu(monkeypatch, 79.0)
    assert 50 < need < 79 and check_memory(c, *args) is None
    mock_gpu(monkeypatch, 39.0)
    msg = check_memory(c, *args)
    assert msg.startswith("batch_size=8, block_size=1024, n_embd=2048, n_layer=24, mode=cocomix:")
    b, steps = largest_batch(c, lambda s: CUDA_SLACK * step_memory(s, VOCAB, *frozen) <= 39 * GIB)
    assert b * steps == 8 * 128 and b < 8
    assert f"--batch_size={b} --gradient_accumulation_steps={steps}" in msg and "\n" not in msg
    mock_gpu(monkeypatch, 20.0, reserved_gib=19.0)  # 20 free + 19 held: the same as 39 free
    assert check_memory(c, *args) == msg
    mock_gpu(monkeypatch, 16.0)
    assert "even batch_size=1 does not fit" in check_memory(c, *args)


def test_largest_batch_keeps_the_global_batch():
    c = {"batch_size": 12, "gradient_accumulation_steps": 2}
    assert largest_batch(c, lambda s: s["batch_size"] <= 5) == (4, 6)
    assert largest_batch(c, lambda s: s["batch_size"] <= 5, world_size=4) == (3, 8)
    assert largest_batch(c, lambda s: False) is None


def test_estimate_grows_with_the_step():
    """The estimate's terms move the way the step does: twice the micro-batch at least 1.5x the
    activations, interleaving above insert_layer more than adding, the labeler's source counted."""
    c = preset(os.path.join(ROOT, "config", "gpu_69m_cocomix.py"))
    base = step_memory(c, VOCAB, *frozen_shapes(c))
    assert step_memory({**c, "batch_size": 64}, VOCAB, *frozen_shapes(c)) > 1.5 * base
    assert step_memory({**c, "mix": "add"}, VOCAB, *frozen_shapes(c)) < base
    assert step_memory(c, VOCAB, None, 32768) < base


def test_ops_run_on_the_meta_device():
    """The LM head and the fused concept head, forward and backward, on the meta device (no
    autocast there): the precision helpers ask autocast only where a device has it."""
    x = torch.empty(64, 16, device="meta", requires_grad=True)
    W = torch.empty(100, 16, device="meta", requires_grad=True)
    b = torch.empty(100, device="meta", requires_grad=True)
    t = torch.zeros(64, dtype=torch.long, device="meta")
    lm_loss(x, W, t, chunk=16).backward()
    values, _, loss = fused_concept_head(
        x, W, b, 4, torch.zeros(64, 2, dtype=torch.long, device="meta")
    )
    (loss + values.sum()).backward()
    for p in (x, W, b):
        assert p.grad.shape == p.shape and p.grad.device.type == "meta"
    # and a CoCoMix student's training loss, forward and backward
    cfg = dict(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=32)
    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg, n_concepts=64, concept_topk=4, insert_layer=1))
        X, labels = torch.randint(0, 1000, (2, 64)), torch.randint(-1, 64, (2, 64, 4))
    loss, parts = Objective(model, "cocomix")(X, X, labels)
    loss.backward()
    assert set(parts) == {"ntp", "concept"} and loss.device.type == "meta"
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
