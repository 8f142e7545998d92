"""The places where the code takes another path on CUDA (docs/method.md, "The CUDA paths"), forced
on a CPU where a flag, an argument or a mock can force them. The arithmetic of the others runs in
the tests docs/method.md names, or on the device in scripts/gpu_check.py."""

import types

import torch
import torch.nn.functional as F

from cocomix.label_cache import label_identity
from cocomix.memory import fake_tensors
from cocomix.ops import default_lm_chunk, lm_loss
from cocomix.runtime import auto_dtype


def test_lm_loss_at_cudas_chunk():
    """The LM-head loss in CUDA's chunks of 4096 rows (a CPU's are 1024), over more rows than one
    chunk holds, with ignored rows: values and gradients equal the full float64 logits'."""
    assert (default_lm_chunk("cuda"), default_lm_chunk("cuda:1"), default_lm_chunk("cpu")) == (
        4096,
        4096,
        1024,
    )
    torch.manual_seed(0)
    N, d, V = 4096 + 37, 8, 70
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = -1
    ref = F.cross_entropy(x @ W.t(), t, ignore_index=-1)
    loss = lm_loss(x, W, t, chunk=default_lm_chunk("cuda"))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (x, W)), torch.autograd.grad(ref, (x, W))):
        torch.testing.assert_close(a, b)


def test_auto_dtype_on_cuda(monkeypatch):
    """dtype='auto' on CUDA: bf16 where the GPU has it, else fp16 (with train.py's GradScaler)."""
    for supported, want in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert auto_dtype("auto", "cuda") == want
    assert auto_dtype("float32", "cuda") == "float32"


def test_label_cache_identity_on_cuda(monkeypatch):
    """A label cache names the kind of device that made it and, on CUDA, whether TF32 was on: an
    SAE whose weights are (fake) CUDA tensors gets another identity than on the CPU, and flipping
    TF32 changes it again, so no cache is read on a device that would round its labels otherwise."""
    import cocomix.label_cache as lc

    monkeypatch.setattr(lc, "source_sha256", lambda path: "0" * 64)  # the same files either way
    monkeypatch.setattr(lc, "file_sha256", lambda path: "1" * 64)

    def identity(device):
        with fake_tensors():  # a CUDA tensor's factory works on fake tensors without a GPU
            weight = torch.empty(16, 8, device=device)
        sae = types.SimpleNamespace(parameters=lambda: iter([weight]), n_latents=16)
        labeler = types.SimpleNamespace(sae=sae, layer=0, k_attr=4, rule="attribution", fill="none")
        return label_identity(labeler, "src", "sae", "bfloat16")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    cpu, cuda = identity("cpu"), identity("cuda")
    # set and put back by hand: cuBLASModule's attributes are not in its __dict__, which newer
    # pytest's monkeypatch reads to restore them
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    try:
        flipped = identity("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert cpu["device"] == "cpu" and "tf32" not in cpu
    assert cuda["device"] == "cuda" and cuda["tf32"] == tf32 and flipped["tf32"] != tf32
    assert {k: v for k, v in cuda.items() if k not in ("device", "tf32")} == {
        k: v for k, v in cpu.items() if k != "device"
    }
