"""
The concept dictionary: what each SAE latent fires on in held-out text (its firing frequency, most
frequent tokens and strongest activations in context), written next to the SAE as
<sae>.concepts.json by `python sae.py --describe` (and at the end of SAE training), and read back
by sample.py to name concepts.
"""

import json
import os

import numpy as np
import torch

from cocomix.corpus import load_tokens, tokenizer
from cocomix.sae_train import val_windows
from cocomix.weights import file_sha256


def top_per_group(groups, scores, n_groups, top):
    """For each group id the positions of its `top` highest scores, as a list of index tensors."""
    order = scores.argsort(descending=True, stable=True)
    order = order[
        groups[order].argsort(stable=True)
    ]  # by group, highest score first within each group
    counts = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    return [order[s : s + min(c, top)] for s, c in zip(starts.tolist(), counts.tolist())]


@torch.no_grad()
def describe(
    sae,
    model,
    layer,
    data_dir,
    tokens=65536,
    top_n=10,
    before=8,
    after=2,
    batch_size=8,
    block_size=None,
    device="cpu",
    out=None,
):
    """For every latent: firing frequency, the tokens it fires on most often and its top_n strongest
    activations with a little context, over held-out text. Writes JSON to `out` when given."""
    enc = tokenizer()
    data, T = load_tokens(data_dir, "val"), block_size or model.config.block_size
    vals, lats, pos, n = [], [], [], 0
    for starts, idx in val_windows(data, T, tokens, batch_size):
        n += len(starts) * T
        values, indices, _, _ = sae.encode(model.forward_to(idx[:, :-1].to(device), layer))
        p = (
            (torch.tensor(starts)[:, None] + torch.arange(T))[..., None]
            .expand_as(indices)
            .to(device)
        )
        on = values > 0
        vals.append(values[on].cpu()), lats.append(indices[on].cpu()), pos.append(p[on].cpu())
    vals, lats, pos = torch.cat(vals), torch.cat(lats), torch.cat(pos)
    toks = torch.from_numpy(data[pos.numpy()].astype(np.int64))
    # most frequent tokens per latent: count (latent, token) pairs, then rank within each latent
    pairs, counts = torch.unique(lats * enc.n_vocab + toks, return_counts=True)
    pair_top = top_per_group(pairs // enc.n_vocab, counts, sae.n_latents, 5)
    act_top = top_per_group(lats, vals, sae.n_latents, top_n)
    freq = torch.bincount(lats, minlength=sae.n_latents).double() / n
    text = lambda ids: enc.decode([int(t) for t in ids])
    concepts = []
    for c in range(sae.n_latents):
        examples = []
        for i in act_top[c].tolist():
            q = int(pos[i])
            examples.append(
                {
                    "context": text(data[max(q - before, 0) : q])
                    + "[["
                    + text(data[q : q + 1])
                    + "]]"
                    + text(data[q + 1 : q + 1 + after]),
                    "token": text(data[q : q + 1]),
                    "act": round(float(vals[i]), 4),
                }
            )
        top_tokens = [
            [text([int(pairs[j]) % enc.n_vocab]), int(counts[j])] for j in pair_top[c].tolist()
        ]
        concepts.append(
            {"id": c, "freq": float(freq[c]), "top_tokens": top_tokens, "examples": examples}
        )
    if out:
        obj = {
            "sae": sae.path,
            "sae_sha256": file_sha256(sae.path) if sae.path and os.path.isfile(sae.path) else None,
            "layer": layer,
            "tokens": n,
            "data_dir": os.path.abspath(data_dir),
            "concepts": concepts,
        }
        try:
            with open(out + ".tmp", "w") as f:
                json.dump(obj, f, ensure_ascii=False)
            os.replace(out + ".tmp", out)
        finally:  # a full disk leaves no half-written dictionary behind
            if os.path.exists(out + ".tmp"):
                os.remove(out + ".tmp")
    return concepts


def load_concepts(path, sae_path=None):
    """Concept dictionary (a list indexed by latent id, or {'concepts': [...]}) -> {id: entry}.
    Given the SAE's file, a dictionary that records another SAE's SHA-256 (one left from an earlier
    SAE at that path) is refused."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path}: not a JSON concept dictionary ({type(e).__name__})") from None
    recorded = obj.get("sae_sha256") if isinstance(obj, dict) else None
    if recorded and sae_path and os.path.isfile(sae_path) and file_sha256(sae_path) != recorded:
        raise ValueError(
            f"{path} describes another SAE than {sae_path} (SHA-256): rerun sae.py --describe"
        )
    entries = obj["concepts"] if isinstance(obj, dict) and "concepts" in obj else obj
    items = (
        entries.items()
        if isinstance(entries, dict)
        else enumerate(entries)
        if isinstance(entries, list)
        else None
    )
    try:
        out = {int(e.get("id", k)): e for k, e in items}
        tops = [t for e in out.values() for t in (e.get("top_tokens") or [])]  # [text, count] pairs
        if not all(isinstance(t, list) and t and isinstance(t[0], str) for t in tops):
            raise TypeError
    except (AttributeError, TypeError, ValueError):
        raise ValueError(
            f"{path}: not a concept dictionary (a list of {{'id', 'top_tokens', ...}} objects, or "
            "{'concepts': [...]}, as sae.py --describe writes)"
        ) from None
    return out


def concept_name(entry, n=3):
    """'www/http/com' from a dictionary entry's most frequent tokens (or its 'name' when it has
    one)."""
    if not entry:
        return ""
    if entry.get("name"):
        return str(entry["name"])
    toks = entry.get("top_tokens") or []
    return "/".join(t.strip() or repr(t) for t, *_ in toks[:n]) if toks else "(dead)"
