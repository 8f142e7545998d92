"""
Concept labels by attribution (../shared/SPEC.md section 2).

For a batch of tokens, the frozen concept source f_con runs forward; at the output
of block `sae_layer` its hidden state h_con becomes the leaf we differentiate the
next-token loss against. The SAE encodes h_con into K_sae active latents a, and
each active latent is scored by how much it moves the loss:

    s = a * (g . W_dec)        g = dL/dh_con,  g . W_dec taken at the active latents only

The K_attr highest-scoring active latents are the token's concept labels. Tokens
with fewer than K_attr active latents get -1 for the missing labels, which the
concept loss ignores.

The labels of a window of tokens depend on nothing that training changes, so
`LabelCache` keeps them on disk next to the token files and every later run with
the same source, SAE and settings reads them instead of running the source again.
"""

import hashlib
import json
import os

import numpy as np
import torch

from model import GPT2_NAMES
from ops import lm_loss

LABEL_RULES = ("attribution", "attribution_pre", "neg_attribution", "abs_attribution", "activation")


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
    """Per batch: top-K_attr concept labels (B, T, K_attr), -1 where a token has too few active latents."""

    def __init__(self, source, sae, layer, k_attr=4, rule="attribution"):
        if rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {rule!r}")
        if not 0 <= layer < source.config.n_layer:
            raise ValueError(f"sae_layer={layer} is outside the concept source's {source.config.n_layer} blocks")
        if not 0 < k_attr <= sae.k:
            raise ValueError(f"k_attr={k_attr} must be in [1, the SAE's k={sae.k}]")
        sae.check_host(source, layer)
        self.source, self.sae, self.layer, self.k_attr, self.rule = source, sae, layer, k_attr, rule

    def hidden_and_grad(self, idx, targets):
        """h_con after block `layer` and g = dL/dh_con for the mean next-token loss L."""
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
        """Scores of the K_sae active latents: (values, indices, s), each (..., K_sae)."""
        sae = self.sae
        values, indices, mu, std = sae.encode(h.float())
        if self.rule == "activation":
            return values, indices, values
        # g . W_dec at the active latents only: gather K_sae decoder rows instead of a dense tokens x C product
        gW = gathered_dot(sae.W_dec.contiguous(), indices, g.float())
        if self.rule == "attribution_pre":  # the paper's equation: pre-activations instead of post-TopK latents
            x, _, _ = sae.standardise(h.float())
            a = sae.encode_pre(x).gather(-1, indices)
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
        s = s.masked_fill(values <= 0, float("-inf"))  # choose among the active latents only
        top, pos = s.topk(self.k_attr, dim=-1)
        labels = indices.gather(-1, pos)
        return labels.masked_fill(torch.isinf(top), -1)


# -----------------------------------------------------------------------------
# Label cache: labels of a window computed once, read by every later run, rank and ablation

LABELS_VERSION = 1  # bump when the labels' arithmetic changes, so that no older cache is served


def source_sha256(path):
    """Content hash of a concept source as model.load_frozen_gpt reads it: our checkpoint (or the
    ckpt.pt in a folder), or a Hugging Face GPT-2 folder's config.json and weights file."""
    from sae import file_sha256
    if path in GPT2_NAMES and not os.path.isdir(path):
        from weights import download_gpt2
        path = download_gpt2(path)  # a cached download after the first time
    if os.path.exists(os.path.join(path, "config.json")):
        weights = os.path.join(path, "model.safetensors")
        weights = weights if os.path.exists(weights) else os.path.join(path, "pytorch_model.bin")  # load_hf_state_dict's order
        both = file_sha256(os.path.join(path, "config.json")) + file_sha256(weights)
        return hashlib.sha256(both.encode()).hexdigest()
    return file_sha256(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)


def label_identity(labeler, source_path, sae_path, dtype):
    """Everything a window's labels depend on besides its tokens and block_size (LabelCache adds those)."""
    from sae import file_sha256
    return {"version": LABELS_VERSION, "source_sha256": source_sha256(source_path), "sae_sha256": file_sha256(sae_path),
            "sae_layer": labeler.layer, "k_attr": labeler.k_attr, "label_rule": labeler.rule,
            "n_concepts": labeler.sae.n_latents, "dtype": dtype}


class LabelCache:
    """Concept labels of the block_size windows of one token file (window w: tokens [w T, w T + T + 1)),
    computed on first use and kept next to that file:

        labels-<digest>.json   what the labels depend on (`label_identity`, block_size, the token file);
                               <digest> is a hash of it, so other settings never open the same files
        labels-<digest>.bin    n_windows x T x k_attr labels (-1 = none), int16 while C <= 32768
        labels-<digest>.done   per window: a keyed hash of the tokens its labels were computed from, 0 = none

    A window's stored labels are used only when its .done entry equals the hash of the tokens asked for,
    keyed with <digest>: a changed token file, files renamed from another cache, or labels written
    but never marked (a crash) all read as misses and are recomputed, never served. Processes (DDP
    ranks) share the files: they only ever write the same values for the same window."""

    def __init__(self, labeler, data_dir, split, block_size, identity):
        from sae import file_sha256
        self.labeler = labeler
        tokens = os.path.join(data_dir, f"{split}.bin")
        data_meta = os.path.join(data_dir, "meta.json")
        n_windows = (os.path.getsize(tokens) // 2 - 1) // block_size  # train.py's grid
        C, K = identity["n_concepts"], identity["k_attr"]
        self.meta = {**identity, "block_size": block_size, "tokens_file": f"{split}.bin",
                     "tokens_bytes": os.path.getsize(tokens), "n_windows": n_windows,
                     # meta.json (prepare.py) names the corpus, so a re-prepared one gets new files; the
                     # tokens themselves are checked window by window (.done), so this need not be exact
                     "data_meta_sha256": file_sha256(data_meta) if os.path.exists(data_meta) else None,
                     "label_dtype": "int16" if C <= 32768 else "int32"}  # labels run from -1 to C - 1
        self.digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.base = os.path.join(data_dir, f"labels-{self.digest}")
        self._claim(self.base + ".json")
        self.table = self._open(self.base + ".bin", np.dtype(self.meta["label_dtype"]), (n_windows, block_size, K))
        self.done = self._open(self.base + ".done", np.dtype(np.uint64), (n_windows,))
        self.hits = self.misses = 0  # windows served from disk / computed, by this process

    def _claim(self, path):
        """Write the identity record, or check the one found: a mismatch means hand-made files."""
        if not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.meta, f, indent=2, sort_keys=True)
            os.replace(tmp, path)  # atomic; ranks racing here write the same text
        with open(path) as f:
            try:
                found = json.load(f)
            except json.JSONDecodeError:
                found = {}
        if found != self.meta:
            keys = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
            raise ValueError(f"label cache {path} does not describe this run (differs in {', '.join(keys)}): "
                             f"renamed or edited by hand? delete {self.base}.* or run with --label_cache=False")

    @staticmethod
    def _open(path, dtype, shape):
        nbytes = int(np.prod(shape)) * dtype.itemsize
        # 'ab' creates a missing file but never truncates one another process is filling; growing a new
        # file to its size leaves it sparse and all zeros (no window done), and two processes growing it
        # at once is harmless: the second truncate to the same size changes nothing
        with open(path, "ab") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                f.truncate(nbytes)
            elif size != nbytes:
                raise ValueError(f"label cache {path} has {size} bytes, expected {nbytes}: delete it")
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def _fingerprints(self, x, y):
        """Per window, a 64-bit hash of its tokens keyed with the digest; never 0, which marks 'not done'."""
        key = bytes.fromhex(self.digest)
        x, y = x.cpu().numpy(), y.cpu().numpy()
        fps = [int.from_bytes(hashlib.blake2b(a.tobytes() + b.tobytes(), digest_size=8, key=key).digest(), "little")
               for a, b in zip(x, y)]
        return np.array(fps, dtype=np.uint64) | np.uint64(1)

    def labels(self, windows, x, y):
        """Labels (B, T, k_attr) for the windows `windows` (B indices into the grid) whose tokens are
        x and targets y (B, T), as ConceptLabeler(x, y) gives them. Call under the same autocast."""
        windows = np.asarray(windows, dtype=np.int64)
        fps = self._fingerprints(x, y)
        hit = self.done[windows] == fps
        out = torch.from_numpy(self.table[windows].astype(np.int64))
        miss = np.flatnonzero(~hit)
        if len(miss):
            # one labeler call for all missing windows (a window drawn twice is simply computed twice)
            new = self.labeler(x[torch.from_numpy(miss).to(x.device)], y[torch.from_numpy(miss).to(y.device)]).cpu()
            self.table[windows[miss]] = new.numpy().astype(self.table.dtype)
            self.table.flush()  # the labels reach the file before the mark that says they are there
            self.done[windows[miss]] = fps[miss]  # a crash before this line leaves the windows unmarked
            out[torch.from_numpy(miss)] = new
        self.hits += len(windows) - len(miss)
        self.misses += len(miss)
        return out.to(x.device)
