"""
FLOPs per token (PaLM appendix B accounting: matmuls and causal attention only), per stage of a
CoCoMix step and of its concept labels, and MFU against the device's dense bf16 peak. For the
benchmarks (bench.py, bench_compile.py); training does not need them.
"""

import math

import torch

PEAK_FLOPS = {  # dense bf16 tensor FLOP/s, no sparsity
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
    "L40": 181e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}
CPU_PEAK_FLOPS = 1e12  # a rough figure for a few cores with AVX-512; only a yardstick


def device_peak_flops(device=None):
    """The device's dense bf16 peak FLOP/s: PEAK_FLOPS by GPU name, 100 TFLOP/s for another GPU."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        keys = [key for key in PEAK_FLOPS if key in name]  # the longest: "L4" is in "L40S" too
        return PEAK_FLOPS[max(keys, key=len)] if keys else 100e12
    return CPU_PEAK_FLOPS


def flops_per_token(model, T):
    """Training FLOPs per token (6N plus attention), with the doubled sequence above insert_layer
    and the concept head and mixing for CoCoMix."""
    cfg = model.config
    d, L = cfg.n_embd, cfg.n_layer
    block = 12 * d * d  # attention + MLP matmul parameters of one block
    L_below = cfg.insert_layer if cfg.has_insert_layer else L
    L_above = L - L_below
    seq = 2 if cfg.interleaved else 1
    flops = 6 * (block * (L_below + seq * L_above) + d * cfg.vocab_size)
    # causal attention: half the T x T (or 2T x 2T) square
    flops += 6 * 2 * d * T * L_below / 2 + 6 * 2 * d * (seq * T) * L_above * seq / 2
    if cfg.n_concepts:
        # none: no compression
        flops += 6 * d * cfg.n_concepts + (6 * cfg.concept_topk * d if cfg.mix != "none" else 0)
    return flops


def estimate_mfu(model, tokens_per_iter, T, dt, device=None):
    """Model FLOPs utilisation: achieved training FLOP/s over the device's bf16 peak."""
    return flops_per_token(model, T) * tokens_per_iter / dt / device_peak_flops(device)


def stage_flops(model, T):
    """Training FLOPs per token of each student stage (forward + backward = 3x the forward). They
    add up to flops_per_token, which is checked here."""
    cfg = model.config
    d, L, below = cfg.n_embd, cfg.n_layer, cfg.insert_layer
    seq = 2 if cfg.interleaved else 1
    # one block at context n: matmuls + half the attention square
    block = lambda n: 3 * (24 * d * d + 2 * d * n)
    f = {
        "below": below * block(T),
        "above": (L - below) * seq * block(seq * T),
        "lm_head": 6 * d * cfg.vocab_size,
        "optimizer": 0,
    }
    if cfg.n_concepts:
        f.update(
            concept=6 * d * cfg.n_concepts,
            mixing=6 * cfg.concept_topk * d if cfg.mix != "none" else 0,
        )
    assert math.isclose(sum(f.values()), flops_per_token(model, T)), (
        "stage FLOPs disagree with flops_per_token"
    )
    return f


def label_flops(labeler, T):
    """FLOPs per token the concept labels need: the source's forward to the SAE layer (no graph),
    the rest of its forward plus a backward for activation gradients only (1x the forward's matmuls,
    2x its attention; the frozen LM head: its input's gradient only), the SAE encoder and the K_sae
    decoder rows of the attribution."""
    cfg, sae = labeler.source.config, labeler.sae
    d, layer = cfg.n_embd, labeler.layer
    fwd, bwd = 24 * d * d + 2 * d * T, 24 * d * d + 4 * d * T
    return {
        "labels: source to SAE layer": (layer + 1) * fwd,
        "labels: SAE + attribution": 2 * d * sae.n_latents + 2 * sae.k * d,
        "labels: rest": (cfg.n_layer - layer - 1) * (fwd + bwd) + 4 * d * cfg.vocab_size,
    }
