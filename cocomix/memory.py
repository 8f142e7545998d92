"""
Device memory without the device. Measured: a step run on fake tensors (FakeTensorMode, which
allocates nothing) under PyTorch's MemTracker, which counts every tensor's storage as it is made
and freed, gives the peak of a full-size step on a machine too small to hold it, for the shapes a
GPU would see (as_on_cuda: the choices the CUDA path makes; scripts/trace_memory.py traces the
presets). Estimated: step_memory, the same peak from the settings alone, which train.py checks
against a CUDA device's free memory before building the model (cocomix/checks.py, check_memory).
"""

from contextlib import contextmanager
from copy import deepcopy

import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.distributed._tools.mod_tracker import ModTracker

from cocomix import ops


class _Modules(ModTracker):
    """MemTracker's module tracker, blind to frozen modules (a concept source): it hooks the
    gradient of each module's inputs, which fails under autograd.grad of a leaf (the labeler's
    dL/dh). Their weights count through track_external."""

    def _fw_pre_hook(self, mod, input):
        if all(p.requires_grad for p in mod.parameters()):
            super()._fw_pre_hook(mod, input)

    def _fw_post_hook(self, mod, input, output):
        if all(p.requires_grad for p in mod.parameters()):
            super()._fw_post_hook(mod, input, output)


class _Tracker(MemTracker):
    """MemTracker keeping the step's peak only: its per-module peaks, which it updates at every op
    over every module met so far, took 70% of a 24-block step's trace."""

    def _update_peak_stats(self, peak_state):
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap[_TOTAL_KEY], deepcopy(snap)


def traced_peak(fn, *modules_and_optimizers):
    """(peak bytes, {category: bytes at the peak}) of fn(), run on fake tensors. fn builds its own
    inputs (and may build models) inside; modules or optimizers made before the call and passed
    here are counted too (as parameters, gradients and optimizer state). The categories are
    MemTracker's: PARAM, BUFFER, GRAD, ACT (saved for the backward), TEMP, OPT, OTH. Every device's
    bytes are added up: the fake step runs on one. Frozen modules (no gradients) are counted only
    when passed here (as PARAM)."""
    tracker = _Tracker()
    tracker._mod_tracker = _Modules()
    if modules_and_optimizers:
        tracker.track_external(*modules_and_optimizers)
    with tracker:
        fn()
    peak = {}
    for per_device in tracker.get_tracker_snapshot("peak").values():
        for kind, n in per_device.items():
            name = str(kind).rsplit(".", 1)[-1]
            peak[name] = peak.get(name, 0) + n
    return peak.pop("Total", 0), peak


fake_tensors = (
    FakeTensorMode  # `with fake_tensors(): ...` builds models and inputs that take no memory
)


@contextmanager
def as_on_cuda():
    """A CPU trace of the CUDA path: the LM head's chunk of a GPU (ops.chunk_device), and attention
    without dropout. CUDA's flash kernel applies dropout inside and keeps only its random state; a
    CPU's kernel has no dropout and falls back to the plain product, which keeps the T x T weights
    and mask (4.3 GiB a block at the 69M preset's size). Without dropout a CPU takes its flash
    kernel, which keeps what CUDA's keeps: the output and a log-sum-exp per row."""
    sdpa, chunk = F.scaled_dot_product_attention, ops.chunk_device

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention, ops.chunk_device = flash, "cuda"
    try:
        yield
    finally:
        F.scaled_dot_product_attention, ops.chunk_device = sdpa, chunk


def gpt_params(V, T, L, d):
    """Parameters of a GPT-2 of vocabulary V, context T, L blocks of width d (tied head)."""
    return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


def step_memory(c, vocab_size, source=None, n_concepts=0):
    """Estimated peak device bytes of one training step of train.py's settings c, at micro-batch
    batch_size under autocast (bf16 or fp16) as on a GPU: what the fake-tensor trace of the step
    measures (scripts/trace_memory.py), without the allocator's slack. source: (n_layer, n_embd)
    of the concept source or KD teacher; n_concepts: the SAE's width C (cocomix).

    Held through the step: the student's fp32 weights, gradients (held across the micro-batches)
    and AdamW's two moments, 16 bytes a parameter, and the frozen source and SAE in fp32. On top,
    the larger of two passes, which run one after the other:
    - the student's micro-batch, what its backward keeps: per token and block (2T tokens above
      insert_layer when interleaved) the fp32 residual stream and LayerNorm inputs, the matmul
      inputs, q k v, attention's output, the MLP's two 4d activations in the compute dtype and the
      dropout masks; the weights' compute-dtype copies; the LM head's N x V logit gradient; for
      cocomix the concept head's N x C softmax; for KD the teacher's hidden states and one chunk's
      fp32 teacher and student log-softmax;
    - cocomix's labeler: the source's blocks above the SAE's layer and its logit gradient, kept for
      dL/dh, or the SAE's N x C fp32 pre-activations, whichever is larger."""
    d, L, T, V = c["n_embd"], c["n_layer"], c["block_size"], vocab_size
    mode, n, Vp = c["mode"], c["batch_size"] * T, V + -V % 64
    e = 4 if c["dtype"] == "float32" else 2  # bytes of the compute dtype
    C = n_concepts if mode == "cocomix" else 0
    P = gpt_params(V, T, L, d) + C * (d + 1) + (C * d + 2 * d if C and c["mix"] != "none" else 0)
    P += d if mode == "pause" else 0
    frozen = 0
    if source is not None and mode in ("cocomix", "kd"):
        Ls, ds = source
        frozen = 4 * gpt_params(V, 1024, Ls, ds) + (4 * (2 * C * ds + C + ds) if C else 0)
    held = 16 * P + frozen
    # the student's pass
    inserted = mode == "pause" or C > 0
    i = min(c["insert_layer"], L) if inserted else L
    wide = 2 if inserted and (mode == "pause" or c["mix"] == "interleave") else 1
    per_token_block = (8 + 15 * e + (2 if c["dropout"] > 0 else 0)) * d
    student = per_token_block * n * (i + wide * (L - i)) + e * P
    # the LM head's logit gradient and input, ln_f's input
    student += n * (e * Vp + e * d + 4 * d * wide)
    if C:  # the softmax p; the head's input, the standardised h and c, fp32
        student += e * n * C + 16 * n * d
    if mode == "kd" and source is not None:
        # the teacher's hidden states; in one chunk its logits, both fp32 log-softmaxes, q and the
        # KL's two temporaries
        student += 4 * n * source[1] + (e + 20) * ops.default_lm_chunk("cuda") * Vp
    labeler = 0
    if C and source is not None:
        # blocks above the SAE's layer (all of them where the SAE file names it, unknown here)
        above = source[0] - c["sae_layer"] - 1 if c["sae_layer"] >= 0 else source[0]
        labeler = max(n * (24 * source[1] * above + e * Vp), 4 * n * C + 16 * n * source[1])
    return held + max(student, labeler)


def largest_batch(c, fits, world_size=1):
    """The largest batch_size below c's that fits(settings) says fits, with
    gradient_accumulation_steps raised to keep the global batch (batch_size times
    gradient_accumulation_steps, which DDP splits over world_size processes):
    (batch_size, gradient_accumulation_steps), or None."""
    total = c["batch_size"] * c["gradient_accumulation_steps"]
    for b in range(c["batch_size"] - 1, 0, -1):
        steps = total // b
        if total % b == 0 and steps % world_size == 0:
            if fits({**c, "batch_size": b, "gradient_accumulation_steps": steps}):
                return b, steps
    return None
