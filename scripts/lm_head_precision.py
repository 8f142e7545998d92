"""
The LM head's gradient under bf16 autocast, against fp64, on the tokens a model predicts with
confidence (p_target >= --p_min): this code's fused head (cocomix/ops.py: LMHeadLoss, which stores
the softmax in bf16 and subtracts the one-hot from it) and the released code's path (bf16 logits,
F.cross_entropy in fp32, whose logit gradient p - onehot is rounded to bf16 once). Near p_t = 1 the
first rounds p_t to bf16's 8 bits before the subtraction, the second after it.

    # GPT-2's width and vocabulary, 1024 tokens
    python -m scripts.lm_head_precision

Synthetic weights and activations (GPT-2's initialisation scale), each token given a margin for a
random target so that p_target spans (0, 1); the error is ||g - g_fp64|| / ||g_fp64|| over the
confident tokens' rows of the input gradient, and over the weight gradient of those tokens alone.
"""

import argparse

import torch
import torch.nn.functional as F

from cocomix.ops import lm_loss


def gradients(x, W, t, path):
    """(dL/dx, dL/dW) of the mean cross-entropy by `path`: fp64, ours or released."""
    x, W = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    if path == "fp64":
        F.cross_entropy(x.double() @ W.double().t(), t).backward()
    else:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            if path == "ours":
                loss = lm_loss(x, W, t)
            else:  # bf16 logits from the head; cross_entropy runs in fp32 under autocast
                loss = F.cross_entropy(F.linear(x, W), t)
        loss.backward()
    return x.grad.double(), W.grad.double()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--p_min", type=float, default=0.9, help="confident: p_target at least this")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    W = torch.randn(a.vocab, a.d, generator=g) * 0.02
    t = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    margin = torch.linspace(0, 16, a.tokens)[torch.randperm(a.tokens, generator=g)]
    direction = W[t] / W[t].norm(dim=-1, keepdim=True) ** 2
    x = torch.randn(a.tokens, a.d, generator=g) + margin[:, None] * direction  # logit_t += margin
    with torch.no_grad():
        p_t = torch.softmax(x.double() @ W.double().t(), -1).gather(1, t[:, None]).squeeze(1)
    sure = p_t >= a.p_min
    ref_x, _ = gradients(x, W, t, "fp64")
    ref_W = gradients(x[sure], W, t[sure], "fp64")[1]
    print(f"{int(sure.sum())} of {a.tokens} tokens with p_target >= {a.p_min}")
    for path in ("ours", "released"):
        gx = gradients(x, W, t, path)[0]
        # the weight gradient of the confident tokens alone: the other targets ignored (lm_loss
        # ignores -1, F.cross_entropy -100)
        gW = gradients(x, W, t.masked_fill(~sure, -1 if path == "ours" else -100), path)[1]
        err_x = (gx[sure] - ref_x[sure]).norm() / ref_x[sure].norm()
        err_W = (gW - ref_W).norm() / ref_W.norm()
        print(f"{path:9s} input gradient error {err_x:.2%}, weight gradient error {err_W:.2%}")


if __name__ == "__main__":
    main()
