"""
Concept labels by attribution (docs/method.md).

For a batch of tokens, the frozen concept source f_con runs forward; at the output
of block `sae_layer` its hidden state h_con becomes the leaf we differentiate the
next-token loss against. The SAE encodes h_con into K_sae active latents a, and
each active latent is scored by how much it moves the loss:

    s = a * (g . W_dec)        g = dL/dh_con,  g . W_dec taken at the active latents only

The K_attr highest-scoring active latents are the token's concept labels. A token
can have fewer than K_attr active latents of positive score; `fill` says what fills
the missing labels:

    "none"      -1, which the concept loss ignores (the default)
    "active"    the next active latents by score, even negative ones (-1 only when
                fewer than K_attr latents are active at all)
    "released"  what the released code's top-k over all C latents gives: inactive
                latents score exactly 0, so zero-score latents chosen by torch.topk's
                tie rule, ahead of any negative score

The SAE encoding and the scores always run in fp32, whatever the training
precision: under bf16 autocast a few percent of the labels would change.

The labels of a window of tokens depend on nothing that training changes, so
label_cache.py keeps them on disk and later runs read them instead of running the
source again.
"""

import torch

from ops import lm_loss

LABEL_RULES = ("attribution", "attribution_pre", "neg_attribution", "abs_attribution", "activation")
LABEL_FILLS = ("none", "active", "released")


def gathered_dot(W, indices, g, chunk=1024):
    """(W[indices] . g) for rows W (C x d), indices (..., K), g (..., d) -> (..., K), in token chunks
    so the tokens x K x d gathered rows never exist all at once."""
    K, d = indices.size(-1), g.size(-1)
    flat_i, flat_g = indices.reshape(-1, K), g.reshape(-1, d)
    out = torch.empty(flat_i.shape, dtype=g.dtype, device=g.device)
    for s in range(0, flat_i.size(0), chunk):
        out[s:s + chunk] = torch.bmm(W[flat_i[s:s + chunk]], flat_g[s:s + chunk].unsqueeze(2)).squeeze(2)
    return out.view(indices.shape)


class ConceptLabeler:
    """Per batch: top-K_attr concept labels (B, T, K_attr), filled by `fill` where a token has too few."""

    def __init__(self, source, sae, layer, k_attr=4, rule="attribution", fill="none"):
        if rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {rule!r}")
        if fill not in LABEL_FILLS:
            raise ValueError(f"label_fill must be one of {LABEL_FILLS}, got {fill!r}")
        if not 0 <= layer < source.config.n_layer:
            raise ValueError(f"sae_layer={layer} is outside the concept source's {source.config.n_layer} blocks")
        if not 0 < k_attr <= sae.k:
            raise ValueError(f"k_attr={k_attr} must be in [1, the SAE's k={sae.k}]")
        sae.check_host(source, layer)
        self.source, self.sae, self.layer, self.k_attr, self.rule, self.fill = source, sae, layer, k_attr, rule, fill

    def hidden_and_grad(self, idx, targets):
        """h_con after block `layer` and g = dL/dh_con, for L the sum over windows of each window's mean
        next-token loss (so that a window's labels do not depend on the rest of the batch)."""
        with torch.no_grad():  # blocks below the SAE layer need no graph
            h = self.source.forward_to(idx, self.layer)
        if self.rule == "activation":
            return h, None
        h = h.detach().requires_grad_(True)
        src = self.source
        with torch.enable_grad():
            x = src.final_hidden(h, self.layer)
            # The LM head's loss in chunks (ops.lm_loss): the B x T x V logits never exist. One mean per
            # window, summed: a window's gradient then does not depend on the other windows in the batch,
            # so LabelCache's labels equal those of any batch. A positive scale per window changes no ranking.
            loss = sum(lm_loss(xb, src.lm_head.weight, tb) for xb, tb in zip(x.unbind(0), targets.unbind(0)))
            (g,) = torch.autograd.grad(loss, h)  # activation gradient only: no parameter grads exist
        return h.detach(), g

    @torch.no_grad()
    def scores(self, h, g):
        """Scores of the K_sae active latents: (values, indices, s), each (..., K_sae), in fp32 whatever
        the training precision (bf16 would reorder a few percent of the labels)."""
        with torch.autocast(h.device.type, enabled=False):
            sae, h = self.sae, h.float()
            values, indices, mu, std = sae.encode(h)
            if self.rule == "activation":
                return values, indices, values
            # g . W_dec at the active latents only: gather K_sae decoder rows, not a dense tokens x C product
            gW = gathered_dot(sae.W_dec.contiguous(), indices, g.float())
            if self.rule == "attribution_pre":  # the paper's equation: pre-activations, not post-TopK latents
                a = sae.encode_pre(sae.standardise(h)[0]).gather(-1, indices)
            else:
                a = values
        s = a * gW
        if self.rule == "neg_attribution":
            s = -s
        elif self.rule == "abs_attribution":
            s = s.abs()
        return values, indices, s

    def __call__(self, idx, targets):
        h, g = self.hidden_and_grad(idx, targets)
        values, indices, s = self.scores(h, g)
        top, pos = s.masked_fill(values <= 0, float("-inf")).topk(self.k_attr, dim=-1)  # among the active latents
        labels = indices.gather(-1, pos).masked_fill(torch.isinf(top), -1)
        if self.fill == "none":
            return labels.masked_fill(top <= 0, -1)
        if self.fill == "released":  # tokens short of positive scores: top-k over all C latents, 0 where inactive
            short = (top <= 0).any(-1)
            dense = torch.zeros(int(short.sum()), self.sae.n_latents, dtype=s.dtype, device=s.device)
            labels[short] = dense.scatter_(-1, indices[short], s[short]).topk(self.k_attr, dim=-1).indices
        return labels
