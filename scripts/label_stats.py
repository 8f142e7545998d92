"""
Concept-label statistics on a trained concept source and SAE, over every block_size window of a
split:

    python -m scripts.label_stats --concept_source=out/reproduce_cpu/source/ckpt.pt \
        --sae_path=out/reproduce_cpu/sae/sae.pt \
        --data_dir=out/reproduce_cpu/data

- the edge case of the labels: tokens with fewer than k_attr active latents of positive score, whose
  missing labels train.py's `label_fill` decides (none: -1, active: lower-scored active latents,
  released: what the released code's top-k over all C latents picks);
- precision: the labels with the source pass under bf16 autocast (as train.py makes them on a bf16
  machine; the SAE and the scores are always fp32) against all-fp32 labels, as the fraction of label
  slots that differ (compared as sets per token).
"""

import argparse

import numpy as np
import torch

from cocomix.corpus import load_tokens
from model import load_frozen_gpt
from sae import LABEL_FILLS, SAE, ConceptLabeler


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concept_source", required=True, help="the concept source")
    p.add_argument("--sae_path", required=True, help="its SAE")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--k_attr", type=int, default=4)
    a = p.parse_args(argv)
    source, sae = load_frozen_gpt(a.concept_source), SAE.load(a.sae_path)
    layer = sae.meta["layer"]
    fills = {f: ConceptLabeler(source, sae, layer, a.k_attr, fill=f) for f in LABEL_FILLS}
    data, T = load_tokens(a.data_dir, a.split), a.block_size
    n_windows = (len(data) - 1) // T
    tokens = short = no_active = diff_bf16 = valid = 0
    differ = {f: 0 for f in fills}
    from cocomix.progress import progress_bar

    for w0 in progress_bar(range(0, n_windows, a.batch_size), desc="windows", unit="batch"):
        ws = range(w0, min(w0 + a.batch_size, n_windows))
        x = torch.from_numpy(np.stack([data[w * T : w * T + T].astype(np.int64) for w in ws]))
        y = torch.from_numpy(
            np.stack([data[w * T + 1 : w * T + T + 1].astype(np.int64) for w in ws])
        )
        lab = fills["none"]
        h, g = lab.hidden_and_grad(x, y)
        values, indices, s = lab.scores(h, g)
        positive = ((s > 0) & (values > 0)).sum(-1)
        tokens += positive.numel()
        short += int((positive < a.k_attr).sum())
        no_active += int(((values > 0).sum(-1) < a.k_attr).sum())
        fp32 = {f: l(x, y).sort(-1).values for f, l in fills.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = lab(x, y).sort(-1).values
        # not in the other set
        diff_bf16 += int((fp32["none"][..., :, None] != bf16[..., None, :]).all(-1).sum())
        valid += int((fp32["none"] >= 0).sum())
        for f in fills:
            differ[f] += int((fp32[f] != fp32["released"]).any(-1).sum())
    slots = tokens * a.k_attr
    print(
        f"{a.split}: {n_windows} windows of {T}, {tokens:,} tokens, SAE k={sae.k}, "
        f"C={sae.n_latents}, layer {layer}, k_attr={a.k_attr}"
    )
    print(
        f"tokens with fewer than k_attr active latents of positive score: {short:,} "
        f"({short / tokens:.3%}); with fewer than k_attr active latents at all: {no_active:,}"
    )
    print(
        f"label slots that are -1 under label_fill='none': {slots - valid:,} of {slots:,} "
        f"({1 - valid / slots:.3%})"
    )
    print(
        "tokens whose labels differ from label_fill='released': "
        + ", ".join(f"{f} {n:,}" for f, n in differ.items())
    )
    print(
        f"bf16 source pass vs all-fp32 labels (label_fill='none'): {diff_bf16:,} of {slots:,} "
        f"label slots differ ({diff_bf16 / slots:.3%})"
    )


if __name__ == "__main__":
    main()
