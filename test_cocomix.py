"""Tests of the model and the training loop. Run: python -m pytest -q"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cocomix.ops import (
    causal_attention,
    concept_loss_reference,
    fused_concept_head,
    kl_rows,
    lm_loss,
    lm_loss_reference,
    sparse_mix,
    sparse_mix_backward_reference,
    sparse_mix_reference,
    sparse_mix_t,
)
from cocomix.weights import load_safetensors
from model import (
    GPT,
    MIX_MODES,
    GPTConfig,
    Objective,
    concept_recall,
    load_checkpoint,
    teacher_of,
)
from tests.fixtures import ENV, ROOT, TINY, read_log, run, wait_for_log_lines, write_data


def tiny_config(**kw):
    args = dict(block_size=32, vocab_size=50257, n_layer=3, n_head=2, n_embd=32)
    args.update(kw)
    return GPTConfig(**args)


# -----------------------------------------------------------------------------
# GPT-2 equivalence


def hf_reference(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(n_positions=64, n_embd=48, n_layer=2, n_head=4, vocab_size=50257)
    ref = transformers.GPT2LMHeadModel(hc).eval()
    # random biases and LayerNorm gains too, not just the init's zeros and ones
    for p in ref.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return ref


def test_logits_match_transformers_save_pretrained(tmp_path):
    ref = hf_reference(tmp_path)
    ref.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = ref(idx).logits
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_logits_match_transformers_published_layout(tmp_path):
    """The published gpt2 files: no 'transformer.' prefix, attention-mask buffers,
    pytorch_model.bin."""
    ref = hf_reference(tmp_path)
    ref.config.to_json_file(str(tmp_path / "config.json"))
    sd = {
        k.removeprefix("transformer."): v
        for k, v in ref.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(ref.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref(idx).logits, atol=1e-5, rtol=1e-5)


def test_forward_returns_logits_for_every_position_with_targets():
    model = GPT(tiny_config())
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 50257)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 50257), idx.view(-1)))


# -----------------------------------------------------------------------------
# CoCoMix parts


@pytest.mark.parametrize("mix", MIX_MODES + ("pause",))
def test_causality_every_mix(mix):
    torch.manual_seed(0)
    kind = dict(pause=True) if mix == "pause" else dict(n_concepts=64, concept_topk=4, mix=mix)
    cfg = tiny_config(insert_layer=1, **kind)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    t = 11
    changed[0, t + 1 :] = torch.randint(0, 50257, (20 - t - 1,))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
        (_, z_a, _), (_, z_b, _) = model.hidden_states(idx), model.hidden_states(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    if z_a is not None:
        torch.testing.assert_close(z_a[:, : t + 1], z_b[:, : t + 1], atol=0, rtol=0)


def test_causal_attention_in_bf16_training_is_the_fused_kernels_function():
    """Training in bf16 on a CPU, causal_attention makes the attention with three batched matmuls
    instead of PyTorch's fused kernel. Its output and gradients are within bf16 rounding of the
    float64 reference (no further from it than the fused kernel in bf16), and a key or value of a
    later position changes no earlier output."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    g = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    for attention in (causal_attention, F.scaled_dot_product_attention):
        out = attention(*low) if attention is causal_attention else attention(*low, is_causal=True)
        grads = torch.autograd.grad(out, low, g.bfloat16())
        errors = [
            (a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))
        ]
        assert max(errors) < 0.03, (attention, errors)
    later = [t.detach().clone() for t in low]
    later[1][:, :, 25:] += 1.0
    later[2][:, :, 25:] -= 1.0
    a, b = (causal_attention(*(t.requires_grad_() for t in ts)) for ts in (low, later))
    torch.testing.assert_close(a[:, :, :25], b[:, :, :25], atol=0, rtol=0)
    assert not torch.equal(a[:, :, 25:], b[:, :, 25:])
    # past T = 512 (a B x H x T x T softmax kept for the backward) it is the kernel itself
    long = [torch.randn(1, 1, 513, 8, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"]
    assert torch.equal(
        causal_attention(*long), F.scaled_dot_product_attention(*long, is_causal=True)
    )


def test_lm_loss_in_bf16_matches_float64():
    """Under bf16 autocast lm_loss makes its GEMMs in bf16 with the vocabulary padded to a multiple
    of 64 (here 1000 -> 1024) and the weight gradient as (x^T G)^T: the loss and both gradients stay
    within bf16 rounding of the float64 full-logit ones, and ignored rows get no gradient."""
    torch.manual_seed(0)
    N, V, d = 300, 1000, 32
    x = (torch.randn(N, d) * 0.5).requires_grad_()
    W = (torch.randn(V, d) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[[5, 200]] = -1
    ref = F.cross_entropy(x.double() @ W.double().t(), targets, ignore_index=-1)
    ref_grads = torch.autograd.grad(ref, (x, W))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(x, W, targets, chunk=128)
    grads = torch.autograd.grad(loss, (x, W))
    assert abs(loss.item() - ref.item()) < 1e-2 and grads[1].dtype == torch.float32
    for got, want in zip(grads, ref_grads):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    assert grads[0][[5, 200]].abs().max() == 0


def dense_mix(values, indices, W):
    """The released code's way, not cocomix/ops.py's: a dense N x C masked matrix times W."""
    dense = torch.zeros(values.size(0), W.size(0), dtype=values.dtype).scatter(1, indices, values)
    return dense @ W


def test_ops_references_are_the_plain_expressions():
    """cocomix/ops.py's readable references (the dense masked product, index_add_ for the mixing
    backward, full-logit cross-entropy and KL) agree with independent expressions and with the fast
    ops."""
    torch.manual_seed(0)
    N, K, C, d = 9, 3, 20, 5
    values = torch.randn(N, K, dtype=torch.float64)
    indices = torch.rand(N, C).argsort(dim=1)[:, :K]
    W = torch.randn(C, d, dtype=torch.float64)
    g = torch.randn(N, d, dtype=torch.float64)
    torch.testing.assert_close(
        sparse_mix_reference(values, indices, W), dense_mix(values, indices, W)
    )
    torch.testing.assert_close(
        sparse_mix(values, indices, W), sparse_mix_reference(values, indices, W)
    )
    v, w = values.clone().requires_grad_(), W.clone().requires_grad_()
    auto = torch.autograd.grad(dense_mix(v, indices, w), (v, w), g)  # autograd of the dense product
    fast = torch.autograd.grad(sparse_mix(v, indices, w), (v, w), g)
    for got in (sparse_mix_backward_reference(g, values, indices, W), fast):
        torch.testing.assert_close(got[0], auto[0])
        torch.testing.assert_close(got[1], auto[1])
    x, targets = torch.randn(N, d, dtype=torch.float64), torch.randint(0, C, (N,))
    targets[2] = -1
    logits = x @ W.t()
    torch.testing.assert_close(
        lm_loss_reference(x, W, targets), F.cross_entropy(logits, targets, ignore_index=-1)
    )
    tx, tW = torch.randn(N, 4, dtype=torch.float64), torch.randn(C, 4, dtype=torch.float64)
    p, q = (tx @ tW.t()).softmax(-1), logits.softmax(-1)
    kl = ((p * (p.log() - q.log())).sum(-1) * (targets >= 0)).sum() / (targets >= 0).sum()
    loss, ce, got_kl = lm_loss_reference(x, W, targets, teacher=(tx, tW), lam_kd=0.3)
    torch.testing.assert_close(got_kl, kl)
    torch.testing.assert_close(loss, ce + 0.3 * kl)


def test_sparse_mix_equals_dense_and_gradcheck():
    torch.manual_seed(0)
    N, K, C, d = 7, 4, 50, 6
    values = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(C)[:K] for _ in range(N)])
    W = torch.randn(C, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_mix(v, indices, w), (values, W))
    out = sparse_mix(values, indices, W)
    g = torch.randn_like(out)
    gv, gW = torch.autograd.grad(out, (values, W), g)
    ref = dense_mix(values, indices, W)
    rv, rW = torch.autograd.grad(ref, (values, W), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gW, rW)


def test_sparse_mix_backward_with_many_repeated_indices():
    """Many tokens choosing the same concepts (3,000 tokens, 8 of 16 concepts each): the weight
    gradient must add up every token's contribution to a concept's row."""
    torch.manual_seed(0)
    N, K, C, d = 3000, 8, 16, 600
    values = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    indices = torch.rand(N, C).argsort(dim=1)[:, :K]  # distinct per token, as TopK gives
    W = torch.randn(C, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(N, d, dtype=torch.float64)
    gv, gW = torch.autograd.grad(sparse_mix(values, indices, W), (values, W), g)
    rv, rW = torch.autograd.grad(dense_mix(values, indices, W), (values, W), g)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gW, rW)


def test_concept_loss_equals_separate_cross_entropies():
    """concept_loss_reference against the released code's K_attr separate CEs."""
    torch.manual_seed(0)
    z = torch.randn(10, 30, requires_grad=True)
    labels = torch.randint(0, 30, (10, 4))
    # the released code's way
    separate = sum(F.cross_entropy(z, labels[:, j]) for j in range(4)) / 4
    torch.testing.assert_close(concept_loss_reference(z, labels), separate)
    # invalid labels (-1) are ignored: the mean is over the valid ones
    labels[0, 2:] = -1
    valid = labels >= 0
    per = -F.log_softmax(z, -1).gather(1, labels.clamp(min=0))
    torch.testing.assert_close(concept_loss_reference(z, labels), per[valid].mean())


def test_sparse_mix_t_is_the_weight_gradient():
    """sparse_mix_t(values, indices, x, C) = S^T x, sparse_mix_backward_reference's grad_W with x
    for the upstream gradient: repeated concepts, concepts nobody chose (rows of zeros), float64."""
    torch.manual_seed(0)
    N, K, C, d = 500, 6, 40, 7
    values = torch.randn(N, K, dtype=torch.float64)
    indices = torch.randint(0, C // 2, (N, K))  # the upper half of the rows is never chosen
    x, W = torch.randn(N, d, dtype=torch.float64), torch.randn(C, d, dtype=torch.float64)
    out = sparse_mix_t(values, indices, x, C)
    torch.testing.assert_close(out, sparse_mix_backward_reference(x, values, indices, W)[1])
    assert out.shape == (C, d) and out[C // 2 :].abs().max() == 0


def concept_head_reference(x, W, b, k, labels):
    """ConceptMixer.predict's plain path: F.linear, torch.topk and concept_loss_reference."""
    z = F.linear(x, W, b)
    return (*torch.topk(z, k, dim=-1), concept_loss_reference(z, labels))


def test_concept_head_op_equals_reference():
    """ops.fused_concept_head (TopK and the concept loss in one op, no N x C tensor in the backward)
    against F.linear + torch.topk + concept_loss_reference in float64: values, indices, loss and the
    gradients of x, W and b from both the loss and the TopK's values, with missing labels, a row
    without any valid label, a label 0 next to -1s (which clamp to 0), labels that are also in the
    TopK, upstream gradients that are not 1, a loss weight of 0 (the lam = 0 ablation) and k = 0
    (mix='none'); then fp32, and bf16 under autocast within its rounding."""
    torch.manual_seed(0)
    B, T, d, C, k = 3, 40, 24, 300, 8
    x0, W0, b0 = (
        torch.randn(B, T, d, dtype=torch.float64),
        torch.randn(C, d, dtype=torch.float64) / 5,
        torch.randn(C, dtype=torch.float64),
    )
    labels = torch.randint(1, C, (B, T, 4))
    labels[0, :5, 2:] = -1
    labels[1, 3] = -1
    labels[2, 7] = torch.tensor([0, -1, 5, -1])
    g_values = torch.randn(B, T, k, dtype=torch.float64)

    def run(fn, dtype, lam, k, autocast=False):
        x, W, b = (t.to(dtype).requires_grad_() for t in (x0, W0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            values, indices, loss = fn(x, W, b, k, labels)
        grads = torch.autograd.grad(
            lam * loss + (values * g_values[..., :k].to(values.dtype)).sum(), (x, W, b)
        )
        return values.detach(), indices, loss.detach(), grads

    # the fixture is what it claims: labels inside the TopK, and a label-less row
    with torch.no_grad():
        top = F.linear(x0, W0, b0).topk(k, dim=-1).indices
        labels[0, 9, 0] = top[0, 9, 0]
    for lam, kk in ((0.7, k), (0.0, k), (0.7, 0)):
        for dtype, autocast, tol in (
            (torch.float64, False, 1e-10),
            (torch.float32, False, 1e-5),
            (torch.float32, True, 1e-2),
        ):
            ref = run(concept_head_reference, torch.float64, lam, kk)
            if autocast:  # the same bf16 logits, so that the TopK picks the same concepts
                ref = run(concept_head_reference, dtype, lam, kk, autocast)
            out = run(fused_concept_head, dtype, lam, kk, autocast)
            assert out[0].dtype == (torch.bfloat16 if autocast else dtype) and out[0].shape == (
                B,
                T,
                kk,
            )
            assert torch.equal(out[1], ref[1])
            torch.testing.assert_close(out[0].double(), ref[0].double(), rtol=tol, atol=tol)
            assert abs(out[2].item() - ref[2].item()) < tol * ref[2].item(), (dtype, autocast)
            for g, r in zip(out[3], ref[3]):
                assert g.dtype == dtype and g.shape == r.shape
                assert ((g.double() - r.double()).norm() / r.double().norm()).item() < tol, (
                    dtype,
                    autocast,
                    lam,
                    kk,
                )
    # no labels, k = 0: no gradient
    assert out[3][0][1, 3].abs().max() == 0 and ref[3][0][1, 3].abs().max() == 0


def test_concept_recall():
    z = torch.tensor([[5.0, 4.0, 3.0, 0.0, 1.0]])
    assert concept_recall(z, torch.tensor([[0, 3]])).item() == 0.5  # top-2 is {0, 1}
    assert concept_recall(z, torch.tensor([[1, -1]])).item() == 1.0


def kd_loss(student_logits, teacher_logits, targets=None):
    """Mean over valid tokens of KL(p_teacher || p_student), full logits (ops.kl_rows per row)."""
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    valid = (
        torch.ones(len(s), dtype=s.dtype)
        if targets is None
        else (targets.reshape(-1) >= 0).to(s.dtype)
    )
    return kl_rows(s, t, valid).sum() / valid.sum().clamp(min=1)


def test_kd_loss_equals_hand_computed_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p, q = t.softmax(-1), s.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t), kl)


@pytest.mark.parametrize("teacher", [False, True])
def test_chunked_lm_loss_equals_full_logits(teacher):
    """ops.lm_loss in row chunks (with autograd: gradients made in the forward; without: summed
    chunks) equals cross-entropy (and KD's KL) of the full logits, values and gradients, in float64,
    with ignored rows and a last chunk shorter than the others."""
    torch.manual_seed(0)
    N, d, dt, V = 23, 8, 6, 50
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[3, 17]] = -1
    tx, tW = torch.randn(N, dt, dtype=torch.float64), torch.randn(V, dt, dtype=torch.float64)
    lam_kd = 0.3
    logits = x @ W.t()
    ref = ce = F.cross_entropy(logits, targets, ignore_index=-1)
    if teacher:
        kl = kd_loss(logits, tx @ tW.t(), targets)
        ref = ce + lam_kd * kl
    ref_gx, ref_gW = torch.autograd.grad(ref, (x, W))
    out = lm_loss(x, W, targets, chunk=5, teacher=(tx, tW) if teacher else None, lam_kd=lam_kd)
    loss = out[0] if teacher else out
    gx, gW = torch.autograd.grad(loss, (x, W))
    torch.testing.assert_close(loss, ref)
    if teacher:  # the two terms, for the log
        torch.testing.assert_close(out[1], ce.detach())
        torch.testing.assert_close(out[2], kl.detach())
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gW, ref_gW)
    assert gx[[3, 17]].abs().max() == 0  # ignored rows get no gradient
    with torch.no_grad():
        out = lm_loss(x, W, targets, chunk=5, teacher=(tx, tW) if teacher else None, lam_kd=lam_kd)
        torch.testing.assert_close(out[0] if teacher else out, ref)


def test_lm_loss_fp16_gradient_is_not_flushed():
    """Under fp16 autocast (what GPUs without bf16 get) the LM head's gradient (softmax - onehot) /
    n must not be cast to fp16 before its matmul: at n = 32,768 rows most entries of p / n fall
    below fp16's smallest number and flush to zero (a few percent of the gradient here, up to half
    of it at GPT-2's vocabulary). lm_loss scales after the matmul, in fp32: its gradients stay
    within fp16's precision of the float64 full-logit gradients."""
    torch.manual_seed(0)
    N, V, d = 32768, 2048, 16
    x = (torch.randn(N, d) * 0.5).requires_grad_()
    W = (torch.randn(V, d) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    ref = torch.autograd.grad(F.cross_entropy(x.double() @ W.double().t(), targets), (x, W))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lm_loss(x, W, targets)
    for g, r in zip(torch.autograd.grad(loss, (x, W)), ref):
        assert (
            (g.double() - r).norm() / r.norm()
        ).item() < 2e-3  # scaling before the matmul: 2-6e-2


def fp16_logit_rows(case, N, V, g):
    """x (N x d), W (V x d) and targets whose logits x W^T fp16 holds exactly (values on a grid of
    2^-3 and 2^-6, or one-hot rows scaled by whole numbers), so that a loss under fp16 autocast can
    be held to its fp64 reference at fp16's rounding of the loss alone. init: small logits, p ~ 1/V
    (every target below fp16's smallest normal at V = 50,257); confident: the target 12-14 nats
    above the V - 1 others (p_t >= 0.99); underflow: 20 nats below them (p_t ~ 2e-12, 0 in fp16)."""
    t = torch.randint(0, V, (N,), generator=g)
    if case == "init":
        x = torch.randint(-2, 3, (N, 16), generator=g) / 8
        W = torch.randint(-4, 5, (V, 16), generator=g) / 8
        return x, W, t
    margin = torch.randint(12, 15, (N, 1), generator=g) if case == "confident" else -20
    return F.one_hot(t, V).float() * margin, torch.eye(V), t


@pytest.mark.parametrize("case", ["init", "confident", "underflow"])
@pytest.mark.parametrize("kd", [False, True])
def test_lm_loss_fp16_equals_fp32_reference(case, kd):
    """Under fp16 autocast the LM head's training loss (and KD's CE and KL) equals the fp64
    reference of the same logits to fp16's rounding (2^-11 relative), at GPT-2's vocabulary at
    initialisation, on confident rows and on rows whose target's probability underflows fp16. A
    clamp of fp16's p_t at its smallest normal capped -log p_t at 9.70 nats (9.70 for 10.83 at
    initialisation); fp16's spacing near 1 put confident rows 4% off."""
    g = torch.Generator().manual_seed(0)
    V = 50257 if case == "init" else 1000
    x, W, t = fp16_logit_rows(case, 64, V, g)
    t[5] = -1
    teacher = (torch.randint(-2, 3, (64, 8), generator=g) / 8, torch.randn(V, 8, generator=g))
    ref = lm_loss_reference(x.double(), W.double(), t, (teacher[0].double(), teacher[1].double()))
    ref = ref if kd else ref[1]  # (CE + lam_kd KL, CE, KL) with the teacher, CE without
    x, W = x.requires_grad_(), W.requires_grad_()
    for grad in (True, False):  # training, and evaluation
        with torch.autocast("cpu", dtype=torch.float16), torch.set_grad_enabled(grad):
            out = lm_loss(x, W, t, chunk=48, teacher=teacher if kd else None)
        for o, r in zip(out if kd else [out], ref if kd else [ref]):
            assert o.dtype == torch.float32
            assert abs(o.item() - r.item()) <= 2**-11 * r.item(), (case, kd, grad, o, r)


@pytest.mark.parametrize("case", ["init", "confident", "underflow"])
def test_fused_concept_head_fp16_equals_fp32_reference(case):
    """The fused concept head's L_concept under fp16 autocast against the fp64 reference of the same
    logits, to fp16's rounding: C = 32,768 concepts at initialisation (9.70 for 10.40 with the
    clamp), confident labels and labels whose probability underflows fp16; its gradients stay the
    reference's within 2% at initialisation."""
    g = torch.Generator().manual_seed(0)
    C = 32768 if case == "init" else 1000
    x, W, t = fp16_logit_rows(case, 64, C, g)
    labels = torch.stack((t, torch.full_like(t, -1)), 1)  # one label of two on each row
    if case == "init":
        labels[:, 1] = torch.randint(0, C, (64,), generator=g)
    b = torch.zeros(C)
    xd, Wd = x.double().requires_grad_(), W.double().requires_grad_()
    ref = concept_head_reference(xd, Wd, b.double(), 8, labels)
    ref_grads = torch.autograd.grad(ref[2], (xd, Wd))
    x, W, b = (a.requires_grad_() for a in (x, W, b))
    with torch.autocast("cpu", dtype=torch.float16):
        values, indices, loss = fused_concept_head(x, W, b, 8, labels)
    assert abs(loss.item() - ref[2].item()) <= 2**-11 * ref[2].item(), (case, loss, ref[2])
    # the gradient p - onehot is fp16's p (as bf16's in bf16): near p = 1 its spacing, 2^-11, is
    # ~8% of a confident row's 1 - p, so only the initialisation's is held to 2%
    for gr, r in zip(torch.autograd.grad(loss, (x, W)), ref_grads):
        assert case != "init" or ((gr.double() - r).norm() / r.norm()).item() < 2e-2


def test_fp16_scaler_skips_an_overflowed_step():
    """train.py's fp16 step (GradScaler around fused AdamW on a CPU, the gradients unscaled and
    clipped before the step) leaves the weights alone when the scaled gradients overflow fp16, and
    halves the scale; the next step, at a scale that fits, trains."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2))
    objective = Objective(model, "ntp")
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert optimizer.defaults["fused"]
    # 2^40 times the loss overflows the fp16 activations' gradients; 2^4 does not
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    idx = torch.randint(0, 50257, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = objective(idx, idx)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        same = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if step == 0:
            assert not math.isfinite(gnorm.item()) and same and scaler.get_scale() == 2.0**39
            scaler.update(2.0**4)
        else:
            assert math.isfinite(gnorm.item()) and not same and scaler.get_scale() == 2.0**4


def test_kd_fast_path_equals_full_logits():
    """The student's KD training loss (train.py: lm_loss of its final hidden states with the
    teacher's), chunked vs from the full logits."""
    torch.manual_seed(0)
    student, source = GPT(tiny_config()), GPT(tiny_config(n_embd=48)).requires_grad_(False)
    idx, targets = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        teacher = teacher_of(source, idx)
    grads, aux = [], []
    for loss_fn in (lm_loss_reference, lm_loss):
        x, _, _ = student.hidden_states(idx)
        loss, ce, kl = loss_fn(x, student.lm_head.weight, targets, teacher=teacher, lam_kd=0.5)
        grads.append(torch.autograd.grad(loss, student.lm_head.weight)[0])
        aux.append({"ntp": ce.detach(), "kd": kl.detach()})
    torch.testing.assert_close(aux[1]["kd"], aux[0]["kd"])
    torch.testing.assert_close(aux[1]["ntp"], aux[0]["ntp"])
    torch.testing.assert_close(
        aux[1]["ntp"], F.cross_entropy(student(idx)[0].flatten(0, 1), targets.flatten())
    )
    torch.testing.assert_close(grads[1], grads[0])
    with torch.no_grad():  # and the KL is the teacher's own: against itself it is zero
        logits = source(idx)[0]
        torch.testing.assert_close(
            kd_loss(logits, teacher[0] @ teacher[1].t()), torch.tensor(0.0), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_groups(decay_all):
    """With zero gradients an AdamW step only decays: by (1 - lr * wd) every matrix, and with
    decay_all (the released recipe) every bias, LayerNorm gain and vector too; otherwise those stay
    put."""
    torch.manual_seed(0)
    m = GPT(tiny_config(n_concepts=64, concept_topk=4, insert_layer=1))
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = m.configure_optimizers(0.1, 0.5, (0.9, 0.95), "cpu", decay_all=decay_all)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in m.named_parameters():
        decayed = p.dim() >= 2 or decay_all
        torch.testing.assert_close(p.detach(), before[k] * (1 - 0.05 if decayed else 1.0), msg=k)
    assert any(p.dim() < 2 for p in m.parameters())


def test_mix_none_with_zero_lambda_trains_like_ntp():
    """Concept prediction only, lam = 0: the shared weights follow exactly the plain GPT's
    trajectory."""
    torch.manual_seed(0)
    ntp = GPT(tiny_config())
    coco = GPT(tiny_config(n_concepts=64, concept_topk=4, insert_layer=1, mix="none"))
    coco.load_state_dict(ntp.state_dict(), strict=False)
    opts = [m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu") for m in (ntp, coco)]
    for step in range(3):
        idx = torch.randint(0, 50257, (2, 16))
        labels = torch.randint(0, 64, (2, 16, 4))
        for m, opt in zip((ntp, coco), opts):
            x, _, concept = m.hidden_states(idx, labels=labels if m is coco else None, fused=True)
            loss = lm_loss(x, m.lm_head.weight, idx)
            if m is coco:  # train.py's objective with lam = 0 (ops.fused_concept_head, k = 0)
                loss = loss + 0.0 * concept
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    coco_sd = coco.state_dict()
    for k, v in ntp.state_dict().items():
        torch.testing.assert_close(coco_sd[k], v, atol=0, rtol=0)


def test_interleave_reads_concept_slots():
    """h_1, c_1, ...: what the LM head reads at position t is the concept slot c_t, not h_t."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_concepts=64, concept_topk=4, insert_layer=2, mix="interleave")).eval()
    idx = torch.randint(0, 50257, (1, 8))
    seen = {}
    model.transformer.h[2].register_forward_hook(lambda m, i, o: seen.update(x=o))
    with torch.no_grad():
        logits, _ = model(idx)
    assert seen["x"].shape[1] == 16
    expected = model.lm_head(model.transformer.ln_f(seen["x"][:, 1::2]))
    torch.testing.assert_close(logits, expected)


def test_config_errors():
    with pytest.raises(ValueError, match="insert_layer=5 is outside"):
        tiny_config(n_concepts=8, insert_layer=5)
    with pytest.raises(ValueError, match="concept_topk=9"):
        tiny_config(n_concepts=8, concept_topk=9, insert_layer=1)
    with pytest.raises(ValueError, match="mix must be"):
        tiny_config(mix="concat")


# Every config/ preset: tokens of the run = max_iters x batch_size x block_size x
# gradient_accumulation_steps, warm-up, width and the recipe switches. The gpu_* rows are the
# released CoCoMix configurations (tokens, 0.5M or 1M per step, warm-up 130 or 65, NTP widths 624 /
# 1072 / 2096, dropout 0.1 and weight decay on every parameter); a new preset must be added here
# with its numbers.
B = 2**19  # 0.5M tokens per step
PRESETS = {  # file: (tokens, tokens per step, warmup_iters, n_embd, dropout, decay_all)
    "gpu_69m_cocomix": (40_000 * B, B, 130, 512, 0.1, True),
    "gpu_69m_ntp": (40_000 * B, B, 130, 624, 0.1, True),
    "gpu_386m_cocomix": (40_000 * B, B, 130, 1024, 0.1, True),
    "gpu_386m_ntp": (40_000 * B, B, 130, 1072, 0.1, True),
    "gpu_1b_cocomix": (20_000 * 2 * B, 2 * B, 65, 2048, 0.1, True),
    "gpu_1b_ntp": (20_000 * 2 * B, 2 * B, 65, 2096, 0.1, True),
    "reproduce_gpu_student": (1000 * B, B, 130, 512, 0.1, True),
    "cpu_source": (1000 * 4096, 4096, -1, 256, 0.0, False),
    "cpu_source_strong": (3400 * 4096, 4096, -1, 256, 0.0, False),
    "cpu_cocomix": (1000 * 4096, 4096, -1, 192, 0.0, False),
    "reproduce_cpu_source": (600 * 4096, 4096, -1, 256, 0.0, False),
    "reproduce_cpu_student": (72 * 4096, 4096, -1, 192, 0.0, False),
    "tiny": (200 * 512, 512, -1, 64, 0.0, False),
    "reproduce_tiny_source": (60 * 128, 128, -1, 64, 0.0, False),
    "reproduce_tiny_student": (40 * 128, 128, -1, 64, 0.0, False),
}


def test_preset_budgets(monkeypatch):
    src = open(os.path.join(ROOT, "train.py")).read()
    defaults = src[src.index("# ---") : src.index("config_keys = ")]  # train.py's settings block
    configurator = open(os.path.join(ROOT, "configurator.py")).read()
    # config files exec their base files from the repo root, as train.py runs them
    monkeypatch.chdir(ROOT)
    files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))
    assert files == sorted(PRESETS), (
        "a preset without its row in PRESETS, or a row without its file"
    )
    for name, (tokens, per_step, warmup, width, dropout, decay_all) in PRESETS.items():
        monkeypatch.setattr(sys, "argv", ["train.py", f"config/{name}.py"])
        c = {}
        exec(defaults, c)
        # train.py's own reading of the file: unknown keys and wrong types fail here
        exec(configurator, c)
        step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
        got = (
            c["max_iters"] * step,
            step,
            c["warmup_iters"],
            c["n_embd"],
            c["dropout"],
            c["decay_all"],
        )
        assert got == (tokens, per_step, warmup, width, dropout, decay_all), name
        # the released loader's order on GPU; the CPU presets keep the draw of their published runs
        assert c["data_order"] == ("epoch" if "gpu" in name else "random"), name


def test_train_help_lists_every_key_with_default_and_comment():
    """python train.py --help and -h exit 0 and list every config key with its default and the
    comment beside it, in train.py's order under its own comment headers (# I/O, # data, ...)."""
    from cocomix.checks import config_keys

    src = open(os.path.join(ROOT, "train.py")).read()
    defaults = {}
    exec(src[src.index("# ---") : src.index("config_keys = ")], defaults)
    file_lines = src.splitlines()
    for flag in ("--help", "-h"):
        out = run("train.py", flag).stdout  # exit 0, or run() raises
        lines = out[out.index("\n# ") + 1 :].splitlines()
        keys = [line.split(" = ")[0].strip() for line in lines if line.startswith("  ")]
        assert keys == config_keys(os.path.join(ROOT, "train.py")), keys
        # headers and keys in the file's order: each help line is the next such line of train.py
        at = 0
        for line in lines:
            if line.startswith("  "):
                name, rest = line.strip().split(" = ", 1)
                assert rest.startswith(repr(defaults[name])), line
                where = next(
                    i for i in range(at, len(file_lines)) if file_lines[i].startswith(name + " =")
                )
                # the comment beside the assignment (also inside a parenthesised value)
                beside = [c.split("#", 1)[1] for c in file_lines[where : where + 3] if "  # " in c]
                if "  # " in file_lines[where] or file_lines[where].endswith("("):
                    assert beside and "#" + beside[0] in line, (line, beside)
            else:
                where = file_lines.index(line, at) if line else at
            at = where
        for header in ("# I/O", "# data", "# model", "# objective", "# system"):
            assert header in lines, header
    for key, default, comment in (
        ("concept_topk", 32, "# K, concepts mixed per token"),
        ("insert_layer", 1, "# the student's block where concepts are predicted and mixed"),
        ("lam", 0.1, "# concept loss weight (0 = mixing only)"),
        ("label_rule", "attribution", "# attribution | attribution_pre"),
    ):
        (line,) = [x for x in out.splitlines() if x.startswith(f"  {key} = ")]
        assert line.startswith(f"  {key} = {default!r}") and comment in line, line


def test_configurator_help_reads_the_calling_script(tmp_path):
    """--help is generic: any script that execs configurator.py gets its own keys, defaults,
    comments and headers, and exits 0 before running anything else."""
    script = tmp_path / "toy.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {ROOT!r})  # the package, as for a script in the repo\n"
        "# -----------------\n"
        "# group one\n"
        "a = 1  # the a\n"
        "b = (\n"
        "    'x'  # the b\n"
        ")\n"
        "\n"
        "# group two, whose comment\n"
        "# spans two lines\n"
        "c = -2.5\n"
        "config_keys = [k for k in ('a', 'b', 'c')]\n"
        f"exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n"
        "a = 99  # set after the settings: not a key\n"
        "print('ran')\n"
    )
    p = run(str(script), "--help", cwd=ROOT)
    body = p.stdout[p.stdout.index("\n# ") + 1 :].splitlines()
    assert p.stdout.startswith("usage: python toy.py") and "ran" not in p.stdout
    assert body == [
        "# group one",
        "  a = 1     # the a",
        "  b = 'x'   # the b",
        "",
        "# group two, whose comment",
        "# spans two lines",
        "  c = -2.5",
    ], body


# -----------------------------------------------------------------------------
# safe loading


def test_safetensors_bad_headers(tmp_path):
    import struct

    good = tmp_path / "ok.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good.write_bytes(
        struct.pack("<Q", len(header)) + header + np.arange(4, dtype=np.float32).tobytes()
    )
    assert load_safetensors(str(good))["w"].tolist() == [[0, 1], [2, 3]]
    cases = {
        "short": (b"\x01\x02", "shorter than"),
        "long_header": (struct.pack("<Q", 10**9) + b"{}", "runs past the end"),
        "not_json": (struct.pack("<Q", 4) + b"abcd", "not valid JSON"),
        "bad_offsets": (struct.pack("<Q", len(header)) + header + b"\0" * 8, "do not fit"),
    }
    for name, (raw, msg) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(raw)
        with pytest.raises(ValueError, match=msg):
            load_safetensors(str(p))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg)}, path)
    model, _ = load_checkpoint(str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(path))


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "model_args": {}}, path)
    with pytest.raises(ValueError):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


# -----------------------------------------------------------------------------
# the training loop, end to end


def test_tiny_run_loss_goes_down_and_checkpoint_samples(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        "--max_iters=40",
        "--eval_interval=20",
        "--learning_rate=3e-3",
        *TINY,
    )
    evals = [r for r in read_log(out) if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 1.0
    assert evals[-1]["val/bpb"] > 0 and evals[-1]["val/ppl"] == pytest.approx(
        np.exp(evals[-1]["val/loss"])
    )
    model, ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 40 and model.config.n_embd == 32


@pytest.mark.parametrize("data_order", ["random", "epoch"])
def test_resume_is_exact(data_dir, tmp_path, data_order):
    """Stopped at step 6 and resumed: the same losses, bit for bit (fp32, CPU), as one run of 12
    steps."""
    common = [
        f"--data_order={data_order}",
        f"--data_dir={data_dir}",
        "--eval_interval=6",
        "--dropout=0.1",
        "--lr_decay_iters=12",
        "--warmup_iters=2",
        *TINY,
    ]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("train.py", f"--out_dir={a}", "--max_iters=12", *common)
    run("train.py", f"--out_dir={b}", "--max_iters=6", *common)
    run("train.py", f"--out_dir={b}", "--max_iters=12", "--init_from=resume", *common)
    steps = lambda out: {r["train_step"]: r["loss"] for r in read_log(out) if "train_step" in r}
    evals = lambda out: {r["iter"]: r["val/loss"] for r in read_log(out) if "val/loss" in r}
    sa, sb = steps(a), steps(b)
    assert [sb[i] for i in range(7, 13)] == [sa[i] for i in range(7, 13)]
    assert evals(a)[12] == evals(b)[12]


ORDER_PROBE = """
import json, runpy, sys
steps = json.loads(sys.argv[1])
sys.argv = ['train.py', *sys.argv[2:]]
g = runpy.run_path('train.py', run_name='__main__')
print('OFFSETS', json.dumps([g['batch_offsets']('train', s).tolist() for s in steps]))
"""


def test_epoch_order_reads_every_window_once_per_epoch(tmp_path):
    """data_order='epoch' (the gpu presets): train.py's batch_offsets gives every window of the
    fixed grid exactly once per epoch, in an order that changes with the epoch and the seed and is
    a pure function of (seed, step): asked for in reverse, in another process, the steps get the
    same windows. The default, 'random', keeps its draw (the CPU presets' batches)."""
    data = str(tmp_path / "data")
    write_data(data)  # 1200 training tokens: 37 windows of 32
    n, T = (1200 - 1) // 32, 32
    steps = list(range(14))  # 8 windows a step (2 micro-batches of 4): 3 epochs and a bit

    def offsets(steps, out, *args):
        p = run(
            "-c",
            ORDER_PROBE,
            json.dumps(steps),
            f"--out_dir={tmp_path / out}",
            *args,
            f"--data_dir={data}",
            "--eval_only=True",
            "--gradient_accumulation_steps=2",
            *TINY,
        )
        return json.loads(next(l[8:] for l in p.stdout.splitlines() if l.startswith("OFFSETS ")))

    a = offsets(steps, "a", "--data_order=epoch", "--seed=1")
    seen = np.concatenate(a)
    assert len(seen) == 14 * 8 and (seen % T == 0).all()
    epochs = [seen[e * n : (e + 1) * n] // T for e in range(3)]
    assert all(sorted(w) == list(range(n)) for w in epochs)  # each window once per epoch
    assert (epochs[0] != epochs[1]).any() and (epochs[1] != epochs[2]).any()
    assert offsets(steps[::-1], "b", "--data_order=epoch", "--seed=1")[::-1] == a
    assert offsets(steps, "c", "--data_order=epoch", "--seed=2") != a
    rand = offsets(steps, "d", "--seed=1")
    assert rand == [
        (np.random.default_rng([1, s, 0]).integers(0, n, 8) * T).tolist() for s in steps
    ]


def test_resume_refuses_other_files_behind_the_same_paths(data_dir, source_and_sae, tmp_path):
    """A resume compares the SHA-256 of the SAE, the concept source and the data's meta.json with
    the ones the run started with: a retrained SAE or a re-prepared corpus at the same path would
    otherwise go on training on other concepts or batches without a word. The files put back, it
    resumes."""
    import shutil

    from sae import SAE

    src, sae = source_and_sae
    data, my_src, my_sae, out = (
        tmp_path / "data",
        tmp_path / "src.pt",
        tmp_path / "sae.pt",
        str(tmp_path / "run"),
    )
    shutil.copytree(data_dir, data)
    shutil.copy(src, my_src)
    shutil.copy(sae, my_sae)
    common = [
        f"--data_dir={data}",
        f"--out_dir={out}",
        "--mode=cocomix",
        f"--concept_source={my_src}",
        f"--sae_path={my_sae}",
        "--eval_interval=2",
        "--label_cache=False",
        *TINY,
    ]
    run("train.py", "--max_iters=2", *common)
    torch.manual_seed(1)
    SAE(32, 128, 8, meta={"layer": 1}).save(str(my_sae))  # retrained at the same path
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(meta.replace("{", '{"note": "re-prepared", ', 1))
    p = run("train.py", "--max_iters=4", "--init_from=resume", *common, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert f"data_dir={data}, sae_path={my_sae} changed since" in p.stderr, p.stderr[-1500:]
    shutil.copy(sae, my_sae)
    (data / "meta.json").write_text(meta)
    run("train.py", "--max_iters=4", "--init_from=resume", *common)
    assert max(r["iter"] for r in read_log(out) if "val/loss" in r) == 4


def test_sigterm_saves_a_checkpoint_and_resumes(data_dir, tmp_path):
    import signal

    out = str(tmp_path / "run")
    p = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--max_iters=100000",
            "--eval_interval=100000",
            *TINY,
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_log_lines(out, 4, 120)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "checkpoint saved" in stdout
    _, ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    stopped = ckpt["iter_num"]
    assert stopped >= 3
    run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        f"--max_iters={stopped + 2}",
        "--eval_interval=100000",
        "--init_from=resume",
        *TINY,
    )
    steps = [r["train_step"] for r in read_log(out) if "train_step" in r]
    # on from where it stopped
    assert steps[-2:] == [stopped + 1, stopped + 2] and steps == sorted(set(steps))


@pytest.mark.parametrize("mode", ["ntp", "mix=none"])
def test_ddp_two_cpu_processes_match_one(mode, data_dir, tmp_path, request):
    """torchrun with 2 gloo processes trains to the losses of 1 process with the same global batch.
    A CoCoMix student with mix=none (prediction only) must own no parameter without a gradient, or
    DDP stops at its second step."""
    common = [
        f"--data_dir={data_dir}",
        "--max_iters=6",
        "--eval_interval=6",
        "--gradient_accumulation_steps=2",
        *TINY,
    ]
    if mode == "mix=none":
        src, sae = request.getfixturevalue("source_and_sae")
        common += [
            "--mode=cocomix",
            "--mix=none",
            f"--concept_source={src}",
            f"--sae_path={sae}",
            "--label_cache=False",
        ]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run("train.py", f"--out_dir={one}", *common)
    run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        f"--out_dir={two}",
        *common,
    )
    l1 = {r["iter"]: r["val/loss"] for r in read_log(one) if "val/loss" in r}
    l2 = {r["iter"]: r["val/loss"] for r in read_log(two) if "val/loss" in r}
    assert l1[6] == pytest.approx(l2[6], abs=1e-4)
    s1 = [r["loss"] for r in read_log(one) if "train_step" in r]
    s2 = [r["loss"] for r in read_log(two) if "train_step" in r]
    assert s1 == pytest.approx(s2, abs=1e-4)


def test_ddp_sigterm_to_one_process_stops_every_process_at_one_step(data_dir, tmp_path):
    """SIGTERM to rank 1 alone (as a scheduler may send it) stops both processes after the same
    step: rank 0 saves that step's checkpoint and says so, and no process is left waiting in an
    all-reduce its peer never joins (where each process decided alone, rank 0 died there)."""
    import re
    import signal

    out = str(tmp_path / "run")
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=100000"]
        + ["--eval_interval=100000", "--gradient_accumulation_steps=2", *TINY],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_log_lines(out, 4, 300)  # the third step
    ranks = {}
    for pid in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split():
        env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if v)
        ranks[env.get("RANK")] = int(pid)
    os.kill(ranks["1"], signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    # torchrun reports each process's exit status: 130, a stop's, or -15 for the process still
    # shutting down when the other exited (torchrun then sends the rest SIGTERM; both have passed
    # the barrier after rank 0's checkpoint by then); no error came from train.py
    codes = re.findall(r"exitcode  : (-?\d+)", stderr)
    assert sorted(codes) in (["130", "130"], ["-15", "130"]), stderr[-3000:]
    assert "terminate called" not in stderr and 'train.py", line' not in stderr, stderr[-3000:]
    _, ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    steps = [r["train_step"] for r in read_log(out) if "train_step" in r]
    assert ckpt["iter_num"] == steps[-1] >= 3, (ckpt["iter_num"], steps)
    assert f"stopped at step {steps[-1]}; checkpoint saved" in stdout, stdout[-2000:]


SYNC_COUNTER = """
import os, runpy, sys, torch
root, n = os.path.dirname(os.path.abspath('train.py')), [0]
def counted(name):  # a read of a tensor's value by the project's own code: a host sync on a GPU
    orig = getattr(torch.Tensor, name)
    def read(self, *a, **k):
        if os.path.dirname(os.path.abspath(sys._getframe(1).f_code.co_filename)) == root:
            n[0] += 1
        return orig(self, *a, **k)
    setattr(torch.Tensor, name, read)
for name in ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu'):
    counted(name)
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
print('SYNCS', n[0])
"""


def test_one_host_sync_per_training_step(data_dir, source_and_sae, tmp_path):
    """The training loop reads the device once per optimizer step, however many micro-batches (the
    CoCoMix student with its labels, 4 micro-batches): the loss, its parts and the gradient norm are
    summed on the device, and the label cache hashes the batch's host copy. Counted as the
    difference between a 2-step and a 6-step run, after a first run has filled the label cache (a
    miss has to bring its new labels to the host to store them)."""
    src, sae = source_and_sae
    syncs = []
    for steps in (6, 2, 6):
        out = str(tmp_path / f"run{steps}")
        p = run(
            "-c",
            SYNC_COUNTER,
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            f"--max_iters={steps}",
            f"--eval_interval={steps}",
            "--gradient_accumulation_steps=4",
            "--mode=cocomix",
            f"--concept_source={src}",
            f"--sae_path={sae}",
            *TINY,
        )
        syncs.append(int(p.stdout.split("SYNCS")[-1]))
    assert (syncs[2] - syncs[1]) / 4 == 1


def test_bad_inputs_fail_clearly_and_touch_nothing(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        "--max_iters=2",
        "--eval_interval=2",
        *TINY,
    )
    ckpt = os.path.join(out, "ckpt.pt")
    before = open(ckpt, "rb").read()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "train.bin").write_bytes(b"\x01\x02\x03")
    (garbage / "val.bin").write_bytes(b"\x01\x02\x03")
    other_vocab = tmp_path / "other_vocab"
    other_vocab.mkdir()
    for s in ("train", "val"):
        (other_vocab / f"{s}.bin").write_bytes(np.ones(1000, np.uint16).tobytes())
    (other_vocab / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 32000}))
    # GPT-2 ids as uint32; a val.bin of another corpus
    wide, mixed = (
        tmp_path / "uint32",
        tmp_path / "mixed",
    )
    for d, dtype, n_val in ((wide, "uint32", 1000), (mixed, "uint16", 900)):
        d.mkdir()
        for s in ("train", "val"):
            (d / f"{s}.bin").write_bytes(np.ones(1000, getattr(np, dtype)).tobytes())
        splits = {"train": {"tokens": 1000}, "val": {"tokens": n_val}}
        (d / "meta.json").write_text(
            json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": dtype, "splits": splits})
        )
    bad_ckpt = tmp_path / "bad"
    bad_ckpt.mkdir()
    (bad_ckpt / "ckpt.pt").write_bytes(before[:1000])
    cases = [
        (["--insert_layer=7", "--mode=pause"], "insert_layer=7 is outside"),
        (["--batch_size=0"], "must be positive"),
        (["--block_size=100000"], "fewer than block_size"),
        (["--no_such_key=1"], "unknown config key 'no_such_key'"),
        (
            ["--VOCAB_SIZE=60000"],
            "unknown config key 'VOCAB_SIZE'",
        ),  # a constant, not a setting: was accepted
        (["--n_layer=two"], "--n_layer expects a int"),
        (["--mode=cocomix"], "needs --concept_source"),
        (["--init_from=resume", "--n_embd=64"], "resume config disagrees"),
        ([f"--data_dir={garbage}"], "odd number of bytes"),
        ([f"--data_dir={other_vocab}"], "vocab_size 32000"),
        ([f"--data_dir={wide}"], "the tokens are uint32"),
        ([f"--data_dir={mixed}"], "val.bin holds 1000 tokens but meta.json says 900"),
        (
            [f"--data_dir={tmp_path}/missing"],
            "prepare a corpus first, e.g. python prepare.py --source shakespeare --out_dir",
        ),
        ([f"--out_dir={bad_ckpt}", "--init_from=resume"], "not a readable checkpoint"),
    ]
    for args, msg in cases:
        p = run(
            "train.py",
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--max_iters=4",
            *TINY,
            *args,
            check=False,
        )
        assert p.returncode != 0, args
        assert msg in p.stderr, (args, p.stderr[-500:])
        assert "Traceback" not in p.stderr, (args, p.stderr[-1500:])
        assert open(ckpt, "rb").read() == before


# -----------------------------------------------------------------------------
# concept labels


def cuda_topk(x, k):
    """torch.topk(x, k) as PyTorch's CUDA kernel selects, emulated in plain Python: by value, +0.0
    above -0.0 (the kernel compares the floats' bits), equal values lowest index first."""
    rows = x.reshape(-1, x.size(-1)).tolist()
    key = lambda r: lambda j: (-r[j], -math.copysign(1.0, r[j]), j)
    idx = torch.tensor([sorted(range(len(r)), key=key(r))[:k] for r in rows])
    idx = idx.view(*x.shape[:-1], k)
    return torch.return_types.topk((x.gather(-1, idx), idx))


def released_labels(source, sae, layer, idx, targets, k_attr, topk=torch.topk):
    """The released code's label algorithm, ported independently of sae.ConceptLabeler:
    differentiate the whole model's mean next-token loss (parameters and all) to the output of block
    `layer`, encode it with the SAE into dense latents over all C, attribution = (g W_dec) *
    latents, and top-k over all C latents, where inactive ones score +0.0 or -0.0, by the sign of g
    . W_dec_j. topk: torch.topk as run here, or cuda_topk, as on the GPU the released runs used.
    Returns (labels, their scores)."""
    seen = {}

    def keep(module, inp, out):
        out.retain_grad()
        seen["h"] = out

    handle = source.transformer.h[layer].register_forward_hook(keep)
    logits, _ = source(idx, targets)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    handle.remove()
    h, g = seen["h"].detach(), seen["h"].grad
    values, indices, _, _ = sae.encode(h)
    latents = torch.zeros(*h.shape[:-1], sae.n_latents).scatter(-1, indices, values)
    attribution = (
        g @ sae.decoder.weight
    ) * latents  # decoder.weight is d x C: g . W_dec for every latent
    top = topk(attribution, k_attr)
    return top.indices, top.values


@pytest.mark.parametrize("fill", ["released", "none", "active"])
def test_labels_equal_the_released_algorithm(fill):
    """sae.ConceptLabeler's labels (activation-gradient shortcut, K_sae scores per token) against
    the released algorithm ported above, on every token of a random source and k=8 SAE, where many
    tokens have fewer than K_attr positive scores: label_fill='released' gives exactly the released
    labels everywhere, 'none' the released labels where they are defined (positive score) and -1
    elsewhere, 'active' the released labels where defined and then the best remaining active
    latents."""
    from sae import SAE, ConceptLabeler

    torch.manual_seed(0)
    source = GPT(tiny_config(n_layer=3)).eval()
    sae = SAE(32, 96, 8, meta={"layer": 1})
    idx, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    labels = ConceptLabeler(source, sae, 1, k_attr=4, fill=fill)(idx, targets)
    ref, ref_score = released_labels(source, sae, 1, idx, targets, 4, cuda_topk)
    defined = ref_score > 0
    short = (~defined).any(-1)
    assert 0 < short.sum() < short.numel()  # the edge case is exercised, and so is the common case
    if fill == "released":  # the labels of the released code run on a GPU, here on the CPU
        assert (labels.sort(-1).values == ref.sort(-1).values).all()
        cpu = released_labels(source, sae, 1, idx, targets, 4)[0]  # torch.topk on the CPU
        assert (cpu.sort(-1).values != ref.sort(-1).values).any()  # the GPU's order matters here
    elif fill == "none":
        assert (labels.sort(-1).values == ref.masked_fill(~defined, -1).sort(-1).values).all()
    # the positive-score labels first (as the released ones), then active latents of lower score
    else:
        assert (labels[defined] == ref[defined]).all()
        values, indices, _, _ = sae.encode(source.forward_to(idx, 1))
        active = torch.zeros(2, 12, 96, dtype=torch.bool).scatter(-1, indices, values > 0)
        picked = labels.clamp(min=0)
        assert (active.gather(-1, picked) | (labels < 0)).all()
        assert ((labels >= 0).sum(-1) == (values > 0).sum(-1).clamp(max=4)).all()


def test_topk_as_cuda_is_cudas_choice():
    """sae.topk_as_cuda against the plain emulation above, on rows full of +0.0, -0.0 and ties:
    the same latents; on distinct values the same as torch.topk."""
    from sae import topk_as_cuda

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 40, generator=g).round(decimals=1)  # ties
    x[x.abs() < 0.5] = 0.0
    x = x * torch.randn(50, 40, generator=g).sign()  # -0.0 where the sign is negative
    assert (x == 0).any() and torch.signbit(x[x == 0]).any() and (~torch.signbit(x[x == 0])).any()
    for k in (1, 4, 30):
        assert (topk_as_cuda(x, k).sort(-1).values == cuda_topk(x, k).indices.sort(-1).values).all()
    y = torch.randn(50, 40, generator=g)
    assert (topk_as_cuda(y, 4) == y.topk(4).indices).all()


def test_label_scores_are_fp32_under_autocast():
    """The SAE encoding and the scores run in fp32 under bf16 autocast: the same (values, indices,
    scores) as without autocast, bit for bit (in bf16 a few percent of the labels would change)."""
    from sae import SAE, ConceptLabeler

    torch.manual_seed(0)
    source = GPT(tiny_config(n_layer=3)).eval()
    sae = SAE(32, 96, 8, meta={"layer": 1})
    labeler = ConceptLabeler(source, sae, 1, k_attr=4)
    idx = torch.randint(0, 50257, (2, 12))
    h, g = labeler.hidden_and_grad(idx, idx)
    # not bf16-representable, so a bf16 encoder would change them
    h, g = (
        h + torch.randn_like(h) * 1e-3,
        g,
    )
    fp32 = labeler.scores(h, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = labeler.scores(h, g)
        assert sae.encode(h)[0].dtype == torch.bfloat16  # the SAE on its own would run in bf16 here
    for a, b in zip(fp32, bf16):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(
    "rule", ["attribution_pre", "neg_attribution", "abs_attribution", "activation"]
)
def test_label_rules(rule):
    from sae import SAE, ConceptLabeler

    torch.manual_seed(0)
    source = GPT(tiny_config()).eval()
    sae = SAE(32, 96, 8, meta={"layer": 1})
    idx = torch.randint(0, 50257, (1, 10))
    base = ConceptLabeler(source, sae, 1, 4)
    h, g = base.hidden_and_grad(idx, idx)
    values, indices, s = base.scores(h, g)
    labels = ConceptLabeler(source, sae, 1, 4, rule, fill="active")(idx, idx)
    pre = sae.encode(h, return_pre=True)[4].gather(-1, indices)
    score = {
        "attribution_pre": s / values.clamp(min=1e-30) * pre,
        "neg_attribution": -s,
        "abs_attribution": s.abs(),
        "activation": values,
    }[rule]
    score = score.masked_fill(values <= 0, float("-inf"))
    top, pos = score.topk(4, -1)
    expected = indices.gather(-1, pos).masked_fill(torch.isinf(top), -1)
    assert (labels.sort(-1).values == expected.sort(-1).values).all()


def test_attribution_pre_scores_a_latent_by_its_pre_activation():
    """The paper's rule (attribution with the pre-activation) equals plain attribution on active
    latents, where pre = ReLU(pre); the two differ where the released fill ranks the SAE's top-k
    latents that did not fire (pre <= 0): there the paper's rule scores pre x (g . W_dec), plain
    attribution 0. The test above cannot see that (fill='active'); here every token has fewer than
    k_attr firing latents, so all are filled."""
    from sae import SAE, ConceptLabeler

    torch.manual_seed(0)
    source = GPT(tiny_config()).eval()
    sae = SAE(32, 96, 8, meta={"layer": 1})
    with torch.no_grad():
        sae.latent_bias -= 4  # the top-k pre-activations mostly negative: few latents fire
    idx = torch.randint(0, 50257, (1, 10))
    paper = ConceptLabeler(source, sae, 1, 4, "attribution_pre", fill="released")
    h, g = paper.hidden_and_grad(idx, idx)
    values, indices = sae.encode(h)[:2]
    pre = sae.encode(h, return_pre=True)[4]
    assert ((values > 0).sum(-1) < 4).all()  # every token short of k_attr firing latents
    # dense g . W_dec, then the top-k latents' scores
    s = (pre * (g @ sae.W_dec_T.t())).gather(-1, indices)
    signed_zeros = torch.zeros_like(pre) * (g @ sae.W_dec_T.t())  # as the released code's
    expected = cuda_topk(signed_zeros.scatter_(-1, indices, s), 4).indices
    labels = paper(idx, idx)
    assert (labels.sort(-1).values == expected.sort(-1).values).all()
    plain = ConceptLabeler(source, sae, 1, 4, "attribution", fill="released")(idx, idx)
    assert (labels.sort(-1).values != plain.sort(-1).values).any()


def test_labeler_refuses_mismatched_sae():
    from sae import SAE, ConceptLabeler

    source = GPT(tiny_config())
    with pytest.raises(ValueError, match="trained on layer 2"):
        ConceptLabeler(source, SAE(32, 96, 8, meta={"layer": 2}), 1)
    with pytest.raises(ValueError, match="d=48"):
        ConceptLabeler(source, SAE(48, 96, 8, meta={"layer": 1}), 1)


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("cocomix", []),
        ("cocomix", ["--mix=add", "--label_rule=activation"]),
        ("cocomix", ["--mix=none", "--lam=0.0"]),
        ("kd", []),
        ("pause", []),
    ],
)
def test_every_objective_trains_and_its_checkpoint_samples(
    data_dir, source_and_sae, tmp_path, mode, extra
):
    ckpt, sae = source_and_sae
    out = str(tmp_path / mode)
    run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        f"--mode={mode}",
        f"--concept_source={ckpt}",
        f"--sae_path={sae}",
        "--max_iters=12",
        "--eval_interval=6",
        "--concept_topk=8",
        "--learning_rate=3e-3",
        *TINY,
        *extra,
    )
    evals = [r for r in read_log(out) if "val/loss" in r]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    if mode == "cocomix" and "--lam=0.0" not in extra:
        assert evals[-1]["val/concept"] < evals[0]["val/concept"]
    model, _ = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert model.config.has_insert_layer == (mode in ("cocomix", "pause"))
    p = run(
        "sample.py",
        f"--out_dir={out}",
        "--num_samples=1",
        "--max_new_tokens=5",
        "--device=cpu",
        "--start=The",
    )
    assert p.stdout.strip()


def test_non_finite_steps_are_skipped_then_stop_without_a_nan_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "nan")
    p = run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        "--max_iters=30",
        "--eval_interval=1000",
        "--learning_rate=1e30",
        "--warmup_iters=0",
        "--decay_lr=False",
        *TINY,
        check=False,
    )
    assert p.returncode != 0
    assert "non-finite loss or gradients, step skipped" in p.stdout
    assert "10 non-finite steps in a row; stopping" in p.stderr
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def test_fused_concept_head_returns_no_z_and_the_plain_path_loss():
    """fused=True (training) keeps no z: hidden_states gives None and the same L_concept as the
    plain path, with or without autograd; training_loss takes the fused path except when it measures
    recall, which needs z."""
    from model import training_loss

    torch.manual_seed(0)
    model = GPT(tiny_config(n_concepts=64, concept_topk=4, insert_layer=1))
    idx, labels = torch.randint(0, 50257, (2, 16)), torch.randint(0, 64, (2, 16, 4))
    x, z, concept_loss = model.hidden_states(idx, labels=labels, fused=True)
    assert z is None and concept_loss.requires_grad
    x0, z0, concept_loss0 = model.hidden_states(idx, labels=labels)  # plain path, autograd on
    assert z0.shape == (2, 16, 64) and concept_loss0.requires_grad
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(concept_loss, concept_loss0)  # fp32: the op and the plain path agree
    with torch.no_grad():
        assert model.hidden_states(idx, labels=labels, fused=True)[1] is None
        _, parts = training_loss(model, idx, idx, "cocomix", labels, recall=True)
    assert 0 <= parts["recall"] <= 1
    loss, parts = training_loss(model, idx, idx, "cocomix", labels)
    assert "recall" not in parts and loss.requires_grad


def test_checkpoints_with_older_names_load(tmp_path):
    """Files written when W_cmp_T was stored as W_cmp, and when the pause baseline was mix='pause',
    load into today's model with the same weights and outputs."""
    torch.manual_seed(0)
    coco = GPT(tiny_config(n_concepts=64, concept_topk=4)).eval()
    sd = {k.replace("mixer.W_cmp_T", "mixer.W_cmp"): v for k, v in coco.state_dict().items()}
    torch.save({"model": sd, "model_args": dataclasses.asdict(coco.config)}, tmp_path / "c.pt")
    loaded, _ = load_checkpoint(str(tmp_path / "c.pt"))
    assert torch.equal(loaded.mixer.W_cmp_T, coco.mixer.W_cmp_T)
    pause = GPT(tiny_config(pause=True)).eval()
    args = {k: v for k, v in dataclasses.asdict(pause.config).items() if k != "pause"}
    torch.save(
        {"model": pause.state_dict(), "model_args": dict(args, mix="pause")}, tmp_path / "p.pt"
    )
    loaded, _ = load_checkpoint(str(tmp_path / "p.pt"))
    assert loaded.config.pause and loaded.config.interleaved
    idx = torch.randint(0, 50257, (1, 8))
    for old, new in ((coco, load_checkpoint(str(tmp_path / "c.pt"))[0]), (pause, loaded)):
        torch.testing.assert_close(new.eval()(idx)[0], old(idx)[0], rtol=0, atol=0)
