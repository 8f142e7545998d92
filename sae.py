"""
TopK sparse autoencoder (Gao et al. 2024) on the residual stream of a GPT after block `layer`
(../shared/SPEC.md section 1). Parameter names follow OpenAI's sparse_autoencoder so their
GPT-2 SAEs load directly.

    x, mu, std = standardise(h)                    per token, Bessel std, eps 1e-5
    pre   = W_enc (x - b_pre) + b_lat              encoder.weight is C x d
    a     = ReLU(TopK_k(pre))                      k non-zero latents per token
    x_hat = W_dec a + b_pre                        decoder.weight is d x C, unit-norm columns
    h_hat = x_hat * std + mu

Train on a GPT checkpoint's activations, evaluate, and describe the latents (dictionary.py):

    python sae.py --ckpt=out/teacher/ckpt.pt --data_dir=data/gutenberg --layer=2 --out=out/sae/sae.pt
    python sae.py --eval_only --sae=out/sae/sae.pt --data_dir=data/gutenberg
    python sae.py --describe --sae=out/sae/sae.pt --data_dir=data/gutenberg
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import signal
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import load_frozen_gpt, standardise
from ops import sparse_mix
from weights import download
from tqdm import tqdm

OPENAI_URL = "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/{location}/autoencoders/{layer}.pt"
OPENAI_STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cocomix")

# -----------------------------------------------------------------------------
# The model


class SAE(nn.Module):

    def __init__(self, d, n_latents, k, meta=None):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        self.d, self.n_latents, self.k = d, n_latents, k
        self.meta = dict(meta or {})
        self.path = None  # the file it was loaded from, for error messages
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.encoder = nn.Linear(d, n_latents, bias=False)
        self.decoder = nn.Linear(n_latents, d, bias=False)
        with torch.no_grad():  # Gao et al.: random unit-norm decoder columns, encoder = decoder^T
            self.decoder.weight.normal_()
            normalise_decoder(self)
            self.encoder.weight.copy_(self.decoder.weight.t())

    @property
    def W_dec(self):
        """Decoder as C x d rows, so that a latent's direction is one row to gather."""
        return self.decoder.weight.t()

    standardise = staticmethod(standardise)

    def encode_pre(self, x):
        """Pre-activations W_enc (x - b_pre) + b_lat of the standardised input x: (..., C)."""
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)

    def topk(self, pre):
        """The k largest pre-activations, ReLU'd: (values, indices), each (..., k)."""
        values, indices = pre.topk(self.k, dim=-1)
        return F.relu(values), indices

    def encode(self, h, return_pre=False):
        """h (..., d) -> (values, indices, mu, std) [+ pre]; the latents a are values at indices."""
        x, mu, std = standardise(h.to(self.pre_bias.dtype))
        pre = self.encode_pre(x)
        values, indices = self.topk(pre)
        return (values, indices, mu, std, pre) if return_pre else (values, indices, mu, std)

    def decode_latents(self, values, indices):
        """W_dec a as a gather of the k chosen decoder columns, weighted by their values (never a dense
        N x C a). The C x d copy is contiguous because embedding_bag on the transposed view is ~50x slower."""
        return sparse_mix(values, indices, self.W_dec.contiguous())

    def decode_sparse(self, values, indices):
        """x_hat = W_dec a + b_pre."""
        return self.decode_latents(values, indices) + self.pre_bias

    def forward(self, h):
        """h (..., d) -> (h_hat, values, indices), h_hat in the units of h."""
        values, indices, mu, std = self.encode(h)
        x_hat = self.decode_sparse(values, indices)
        return x_hat * std + mu, values, indices

    # -------------------------------------------------------------------------
    # files

    def save(self, path):
        """Our format, written atomically so a crash never leaves a half-written SAE behind."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        obj = {"state_dict": self.state_dict(), "d": self.d, "n_latents": self.n_latents, "k": self.k, "meta": self.meta}
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path, map_location="cpu", layer=None):
        """Our files, OpenAI's GPT-2 SAE state dicts, or 'openai:<location>/<layer>' (downloaded).
        `layer` fills in the host layer for OpenAI files, whose state dicts do not record it."""
        host = None
        if path.startswith("openai:"):
            location, _, lay = path.removeprefix("openai:").rpartition("/")
            layer = int(lay) if layer is None else layer
            path, host = download_openai_sae(location or "resid_post_mlp_v5_32k", int(lay)), "gpt2"
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError:  # torch's own message advises weights_only=False, which would run its code
            raise ValueError(f"{path}: not a readable SAE file (not a torch file of plain tensors, or truncated)") from None
        except Exception as e:  # truncated or foreign files fail here, never by running them
            raise ValueError(f"{path}: not a readable SAE file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if isinstance(obj, dict) and "state_dict" in obj and "n_latents" in obj:
            sae = cls._from_ours(obj, path)
        elif isinstance(obj, dict) and "encoder.weight" in obj:
            sae = cls._from_openai(obj, path)
        else:
            raise ValueError(f"{path}: not an SAE file (neither our 'state_dict' format nor OpenAI's 'encoder.weight' keys)")
        if host is not None:  # the paper's SAEs were trained on GPT-2 small
            sae.meta.setdefault("host", host)
        if layer is not None:
            if sae.meta.get("layer") not in (None, layer):
                raise ValueError(f"{path}: the file says layer {sae.meta['layer']}, but layer={layer} was asked for")
            sae.meta["layer"] = layer
        sae.path = path
        return sae.to(map_location)

    @classmethod
    def _from_ours(cls, obj, path):
        try:
            sae = cls(int(obj["d"]), int(obj["n_latents"]), int(obj["k"]), obj.get("meta"))
            sae.load_state_dict(obj["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: malformed SAE file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return sae

    @classmethod
    def _from_openai(cls, sd, path):
        act = sd.get("activation")
        if act != "TopK":
            raise ValueError(f"{path}: OpenAI SAE with activation {act!r}; only TopK SAEs are supported")
        act_sd = sd.get("activation_state_dict", {})
        if not isinstance(act_sd, dict) or "k" not in act_sd or act_sd.get("postact_fn", "ReLU") != "ReLU":
            raise ValueError(f"{path}: OpenAI TopK SAE without k or with a non-ReLU postact_fn ({act_sd!r})")
        try:
            C, d = sd["encoder.weight"].shape
            expected = {"pre_bias": (d,), "latent_bias": (C,), "encoder.weight": (C, d), "decoder.weight": (d, C)}
            for key, shape in expected.items():
                if tuple(sd[key].shape) != shape:
                    raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, expected {shape}")
            # trained on LN-style standardised inputs, as SPEC section 1; the statistics buffers are not weights
            sae = cls(d, C, int(act_sd["k"]), {"source": "openai", "file": os.path.abspath(path), "d": d,
                                                "tokenizer": "gpt2", "layer": None})
            sae.load_state_dict({key: sd[key].float() for key in expected})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: malformed OpenAI SAE state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return sae

    def check_host(self, host, layer):
        """Refuse a concept source (GPT, GPTConfig or model_args dict) whose width or layer differs."""
        cfg = getattr(host, "config", host)
        d = cfg["n_embd"] if isinstance(cfg, dict) else cfg.n_embd
        trained = self.meta.get("layer")
        if d != self.d or (trained is not None and trained != layer):
            where = f"layer {trained} of a d={self.d} model" if trained is not None else f"a d={self.d} model (layer unknown)"
            raise ValueError(f"SAE {self.path or '(in memory)'} was trained on {where}; "
                             f"the concept source has d={d} at layer {layer}")


@torch.no_grad()
def normalise_decoder(sae):
    """Unit-norm decoder columns, so latent magnitudes live in the activations, not the dictionary."""
    W = sae.decoder.weight
    W.div_(W.norm(dim=0, keepdim=True).clamp(min=1e-12))


@torch.no_grad()
def project_decoder_grad(sae):
    """Drop each column's gradient component along the column: the step then only rotates it."""
    W, g = sae.decoder.weight, sae.decoder.weight.grad
    if g is not None:
        g.sub_((g * W).sum(dim=0, keepdim=True) * W)


def download_openai_sae(location="resid_post_mlp_v5_32k", layer=5, cache_dir=None):
    """Fetch one of OpenAI's GPT-2 small SAEs (the paper's: resid_post_mlp_v5_32k, layer 5) into a cache."""
    dst = os.path.join(cache_dir or CACHE_DIR, "openai_sae", location, f"{layer}.pt")
    return download(OPENAI_URL.format(location=location, layer=layer), dst,
                    f"SAE.load('/path/to/{layer}.pt', layer={layer})")


# -----------------------------------------------------------------------------
# Activations: the host's standardised hidden states on random windows of the token files


def load_tokens(data_dir, split):
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; make it with python prepare.py --input TEXT --out_dir {data_dir}")
    return np.memmap(path, dtype=np.uint16, mode="r")


def val_windows(data, T, tokens, B):
    """Consecutive non-overlapping windows of T+1 tokens (inputs and shifted targets) from the start of
    `data`, in batches of B: yields (start offsets, (b, T+1) int64). Deterministic, so evals compare."""
    n = min(max(tokens // T, 1), (len(data) - 1) // T)
    if n < 1:
        raise ValueError(f"the held-out split has {len(data)} tokens, fewer than one window of {T + 1}")
    for s in range(0, n, B):
        starts = [i * T for i in range(s, min(s + B, n))]
        yield starts, torch.from_numpy(np.stack([data[i:i + T + 1].astype(np.int64) for i in starts]))


@torch.no_grad()
def activation_chunk(model, layer, data, T, B, seed, c, device="cpu"):
    """Chunk c of the activation stream: standardised hidden states after block `layer` on B windows of T
    tokens at random offsets, (B*T, d). A pure function of (seed, c), so a resumed run can recompute any chunk."""
    ix = np.random.default_rng([seed, c]).integers(0, len(data) - T + 1, B).tolist()
    h = model.forward_to(torch.from_numpy(np.stack([data[i:i + T].astype(np.int64) for i in ix])).to(device), layer)
    return standardise(h.float())[0].view(-1, h.size(-1))


class ShuffleBuffer:
    """Minibatches drawn at random from a pool of `size` activations. Neighbouring tokens of one window
    are highly correlated, so a minibatch straight from the host would be a few documents; the pool mixes
    many. Once half the pool has been served, the served rows are replaced by fresh ones.
    Row i of the stream is row i % chunk_rows of `chunk(i // chunk_rows)`, and the pool keeps the number of
    each row it holds: its state is then a few index tensors (the pool itself is GBs at GPT-2 scale), and a
    resume rebuilds it exactly at the cost of one host pass per chunk still in it (~log2(chunk_rows) pools)."""

    def __init__(self, chunk, chunk_rows, size, batch_size, gen, state=None):
        if batch_size > size // 2:
            raise ValueError(f"batch_size={batch_size} must be at most half the buffer ({size})")
        self.chunk, self.chunk_rows, self.batch_size, self.gen, self.cached = chunk, chunk_rows, batch_size, gen, (None, None)
        if state is None:
            self.ids, self.next = torch.arange(size), size
            self.reshuffle()
        else:
            self.ids, self.order, self.pos, self.next = state["ids"], state["order"], state["pos"], state["next"]
            gen.set_state(state["gen"])
        self.pool = self.rows(self.ids)

    def state_dict(self):
        return {"ids": self.ids.clone(), "order": self.order.clone(), "pos": self.pos, "next": self.next, "gen": self.gen.get_state()}

    def rows(self, ids):
        """The activations numbered `ids`, one host pass per chunk; the last chunk is kept, since one
        refill ends in the chunk where the next begins."""
        chunk_of, out = ids // self.chunk_rows, None
        for c in chunk_of.unique().tolist():
            if self.cached[0] != c:
                self.cached = (c, self.chunk(c))
            x, m = self.cached[1], chunk_of == c
            out = x.new_empty(len(ids), x.size(1)) if out is None else out
            out[m.to(x.device)] = x[(ids[m] % self.chunk_rows).to(x.device)]
        return out

    def reshuffle(self):
        self.order, self.pos = torch.randperm(len(self.ids), generator=self.gen), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.ids) // 2:
            served = self.order[:self.pos]
            self.ids[served] = fresh = torch.arange(self.next, self.next + len(served))
            self.pool[served.to(self.pool.device)] = self.rows(fresh)
            self.next += len(served)
            self.reshuffle()
        rows = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.pool[rows.to(self.pool.device)]


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def geometric_median(x, iters=20):
    """Weiszfeld's iterations from the mean: a robust centre for b_pre (Gao et al.)."""
    m = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=1e-8)
        m = (w[:, None] * x).sum(dim=0) / w.sum()
    return m


def normalized_mse(x_hat, x):
    """MSE over the MSE of predicting the batch mean: a batch FVU, comparable across layers and models."""
    return (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean(dim=0)).pow(2).sum(-1).mean()


def sae_loss(sae, x, dead, k_aux, aux_coef):
    """Reconstruction FVU plus aux_coef * AuxK: the top k_aux dead latents' pre-activations reconstruct the
    residual error, which gives dead latents a gradient towards what the live ones miss."""
    pre = sae.encode_pre(x)
    values, indices = sae.topk(pre)
    x_hat = sae.decode_sparse(values, indices)
    fvu = normalized_mse(x_hat, x)
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if aux_coef > 0 and n_dead > 0:
        e = x - x_hat.detach()  # AuxK trains the dead latents only; the main path is not pushed by it
        aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
        e_hat = sae.decode_latents(F.relu(aux_values), aux_indices)
        aux = normalized_mse(e_hat, e).nan_to_num(0.0)
    return fvu + aux_coef * aux, fvu.detach(), aux.detach(), values.detach(), indices


def lr_at(step, steps, lr):
    """Constant, then linear to 0 over the last 20% of steps: the end of training averages out noise."""
    return lr * min(1.0, (steps - step) / (0.2 * steps))


def train(sae, batches, steps, lr, dead_tokens, k_aux=None, aux_coef=1 / 32, log=None, progress=True,
          log_interval=10, state=None, checkpoint=None, ckpt_interval=0):
    """Adam on standardised activation minibatches `batches` (an iterator of (N, d)); returns the last
    logged step's metrics. `log(dict)` is called every log_interval steps. Dead = no activation in the last
    dead_tokens tokens. `checkpoint(state)` gets all the loop carries over every ckpt_interval steps, at the end
    and on SIGINT/SIGTERM, which stop training after that step (metrics say "stopped"); `state` resumes one."""
    k_aux = k_aux or sae.d // 2
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)  # Gao et al.'s eps
    since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=sae.pre_bias.device)
    start, tokens, m, t0 = 0, 0, None, time.time()
    if state is not None:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired.copy_(state["since_fired"])
        torch.set_rng_state(state["torch_rng"])  # unused by the loop today; kept so that adding noise stays exact
        start, tokens, m = state["step"], state["tokens"], state["metrics"]
    stop = []  # signals only set a flag: the step in progress finishes, so the saved state is a consistent one
    handlers = {s: signal.signal(s, lambda *_: stop.append(1)) for s in (signal.SIGINT, signal.SIGTERM)} if checkpoint else {}
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="sae")
    try:
        for step in bar:
            x = next(batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            dead = since_fired >= dead_tokens
            loss, fvu, aux, values, indices = sae_loss(sae, x, dead, k_aux, aux_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            project_decoder_grad(sae)
            opt.step()
            normalise_decoder(sae)
            since_fired += len(x)
            since_fired[indices[values > 0]] = 0
            tokens += len(x)
            if step % log_interval == 0 or step == steps - 1:
                m = {"step": step, "tokens": tokens, "fvu": fvu.item(), "auxk": aux.item(), "l0": (values > 0).sum(-1).float().mean().item(),
                     "dead": dead.float().mean().item(), "lr": lr_at(step, steps, lr), "time": round(time.time() - t0, 2)}
                bar.set_postfix(fvu=f"{m['fvu']:.4f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead']:.3f}")
                if log:
                    log(m)
            if checkpoint and (stop or step + 1 == steps or ckpt_interval and (step + 1) % ckpt_interval == 0):
                checkpoint({"step": step + 1, "tokens": tokens, "metrics": m, "sae": sae.state_dict(), "opt": opt.state_dict(),
                            "since_fired": since_fired, "torch_rng": torch.get_rng_state()})
            if stop:
                return {**m, "stopped": step + 1}
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return m


# -----------------------------------------------------------------------------
# Evaluation (the concept dictionary, what each latent fires on, is dictionary.py)


def summed_ce(model, h, layer, targets):
    """Summed next-token cross-entropy of the host finishing its pass from h after block `layer`."""
    logits = model.forward_from(h, layer).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, reduction="sum").item()


@torch.no_grad()
def evaluate(sae, model, layer, data_dir, tokens=65536, batch_size=8, block_size=None, device="cpu"):
    """On held-out windows: FVU, L0, dead fraction (never fired in these tokens) and the host's next-token
    loss with its hidden state after `layer` replaced by the SAE's reconstruction (delta_ce, nats)."""
    data, T = load_tokens(data_dir, "val"), block_size or model.config.block_size
    n = err = sq = l0 = ce = ce_sae = 0.0
    s1 = torch.zeros(sae.d, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for _, idx in val_windows(data, T, tokens, batch_size):
        idx = idx.to(device)
        inp, tgt = idx[:, :-1], idx[:, 1:].reshape(-1)
        h = model.forward_to(inp, layer).float()
        x, mu, std = standardise(h)
        values, indices = sae.topk(sae.encode_pre(x))
        x_hat = sae.decode_sparse(values, indices)
        n += x.numel() // sae.d
        err += (x_hat - x).double().pow(2).sum().item()
        sq += x.double().pow(2).sum().item()
        s1 += x.double().sum(dim=(0, 1))
        l0 += (values > 0).sum().item()
        fired[indices[values > 0]] = True
        ce += summed_ce(model, h, layer, tgt)
        ce_sae += summed_ce(model, x_hat * std + mu, layer, tgt)
    fvu = err / (sq - s1.pow(2).sum().item() / n)  # sum (x - mean x)^2 = sum x^2 - n |mean x|^2
    return {"fvu": fvu, "l0": l0 / n, "dead": 1.0 - fired.float().mean().item(), "ce": ce / n,
            "ce_sae": ce_sae / n, "delta_ce": (ce_sae - ce) / n, "tokens": int(n)}


# -----------------------------------------------------------------------------
# Command line


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def arg_parser():
    p = argparse.ArgumentParser(description="Train, evaluate or describe a TopK SAE on a GPT's residual stream.")
    p.add_argument("--ckpt", help="host GPT: ckpt.pt (or its folder), a GPT-2 Hugging Face folder, or 'gpt2'")
    p.add_argument("--data_dir", required=True, help="folder with train.bin and val.bin (prepare.py)")
    p.add_argument("--layer", type=int, help="block whose output is encoded (0-based)")
    p.add_argument("--out", default="out/sae/sae.pt", help="where the trained SAE is written")
    p.add_argument("--sae", help="an existing SAE for --eval_only / --describe (default --out); 'openai:resid_post_mlp_v5_32k/5' downloads")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--describe", action="store_true", help="only write <sae>.concepts.json")
    p.add_argument("--n_latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training activations")
    p.add_argument("--batch_size", type=int, default=4096, help="activations per step")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(n_latents / 2^14) (Gao et al.)")
    p.add_argument("--buffer", type=int, default=1 << 18, help="shuffling buffer, activations")
    p.add_argument("--dead_tokens", type=int, default=None, help="default min(10M, tokens / 10)")
    p.add_argument("--k_aux", type=int, default=None, help="default d / 2")
    p.add_argument("--aux_coef", type=float, default=1 / 32)
    p.add_argument("--block_size", type=int, default=None, help="window length; default the host's")
    p.add_argument("--host_batch", type=int, default=8, help="windows per host forward pass")
    p.add_argument("--eval_tokens", type=int, default=65536)
    p.add_argument("--log_interval", type=int, default=10, help="steps between lines of <out>.metrics.jsonl")
    p.add_argument("--ckpt_interval", type=int, default=500, help="steps between saves of <out>.resume.pt "
                   "(0: only at the end and on SIGINT/SIGTERM); a run with that file and the same settings resumes")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    return p


def main(argv=None):
    a = arg_parser().parse_args(argv)
    torch.manual_seed(a.seed)

    if a.eval_only or a.describe:
        sae = SAE.load(a.sae or a.out, map_location=a.device, layer=a.layer)
        layer, ckpt = sae.meta.get("layer"), a.ckpt or sae.meta.get("host")
        if layer is None or ckpt is None:
            raise SystemExit(f"error: {sae.path} does not record its host and layer; pass --ckpt and --layer")
        model = load_frozen_gpt(ckpt, a.device)
        sae.check_host(model, layer)
        if a.describe:
            from dictionary import describe  # here, not at the top: dictionary.py imports this file
            out = os.path.splitext(sae.path)[0] + ".concepts.json"
            describe(sae, model, layer, a.data_dir, a.eval_tokens, block_size=a.block_size, device=a.device, out=out)
            print(f"wrote {out}")
        if a.eval_only:
            print(json.dumps(evaluate(sae, model, layer, a.data_dir, a.eval_tokens, a.host_batch, a.block_size, a.device)))
        return

    if a.ckpt is None or a.layer is None:
        raise SystemExit("error: training needs --ckpt and --layer")
    model = load_frozen_gpt(a.ckpt, a.device)
    cfg = model.config
    if not 0 <= a.layer < cfg.n_layer:
        raise SystemExit(f"error: --layer={a.layer} is outside the host's {cfg.n_layer} blocks")
    T = a.block_size or cfg.block_size
    lr = a.lr or 2e-4 / math.sqrt(a.n_latents / 2 ** 14)
    dead_tokens = a.dead_tokens or min(10_000_000, a.tokens // 10)
    steps = max(1, a.tokens // a.batch_size)
    settings = dict(vars(a), lr=lr, dead_tokens=dead_tokens, block_size=T, steps=steps)
    host = os.path.join(a.ckpt, "ckpt.pt") if os.path.isdir(a.ckpt) and not os.path.exists(os.path.join(a.ckpt, "config.json")) else a.ckpt
    meta = {"host": os.path.abspath(host) if os.path.exists(host) else host,
            "host_sha256": file_sha256(host) if os.path.isfile(host) else None,
            "layer": a.layer, "d": cfg.n_embd, "tokenizer": "gpt2", "data_dir": os.path.abspath(a.data_dir),
            "train": settings}
    # Resume: everything the trained SAE depends on must match; where files go, how often and where it runs need not
    same = {k: v for k, v in settings.items() if k not in ("ckpt", "data_dir", "out", "sae", "eval_only", "describe",
                                                           "eval_tokens", "device", "log_interval", "ckpt_interval")}
    same.update(host=meta["host_sha256"] or meta["host"], data_dir=meta["data_dir"])
    resume_path, saved = os.path.splitext(a.out)[0] + ".resume.pt", None
    if os.path.exists(resume_path):  # checked before anything is written, so a refusal leaves every file as it was
        try:
            saved = torch.load(resume_path, map_location="cpu", weights_only=True)
            old = saved["settings"]
        except Exception as e:
            raise SystemExit(f"error: {resume_path} is not a readable resume file ({type(e).__name__}); delete it to start over")
        diff = [f"{k}={same.get(k)!r} (resume file: {old.get(k)!r})" for k in sorted(set(old) | set(same)) if old.get(k) != same.get(k)]
        if diff:
            raise SystemExit(f"error: {resume_path} was written with other settings: {', '.join(diff)}; use those or delete it")
    sae = SAE(cfg.n_embd, a.n_latents, a.k, meta).to(a.device)
    sae.path = a.out
    data = load_tokens(a.data_dir, "train")
    chunk = lambda c: activation_chunk(model, a.layer, data, T, a.host_batch, a.seed, c, a.device)
    buffer = ShuffleBuffer(chunk, a.host_batch * T, a.buffer, a.batch_size, torch.Generator().manual_seed(a.seed),
                           saved and saved["buffer"])
    if saved is None:
        with torch.no_grad():  # b_pre at the data's centre, so the encoder starts by looking at deviations from it
            sae.pre_bias.copy_(geometric_median(buffer.pool[:min(len(buffer.pool), 32768)]))
    # to a temporary file, then renamed: a crash while writing keeps the previous one
    checkpoint = lambda state: (torch.save({"settings": same, "train": state, "buffer": buffer.state_dict()}, resume_path + ".tmp"),
                                os.replace(resume_path + ".tmp", resume_path))
    log_path = os.path.splitext(a.out)[0] + ".metrics.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(log_path, "a") as f:  # after a resume, steps since the last save appear twice, identically
        log = lambda m: (f.write(json.dumps(m) + "\n"), f.flush())
        log({"settings": settings} if saved is None else {"resume": saved["train"]["step"]})
        m = train(sae, buffer, steps, lr, dead_tokens, a.k_aux, a.aux_coef, log=log, log_interval=a.log_interval,
                  state=saved and saved["train"], checkpoint=checkpoint, ckpt_interval=a.ckpt_interval)
        if "stopped" in m:
            print(f"stopped at step {m['stopped']} of {steps}; run the same command to resume from {resume_path}")
            return
        sae.meta["train_final"] = m
        sae.meta["eval"] = evaluate(sae, model, a.layer, a.data_dir, a.eval_tokens, a.host_batch, T, a.device)
        log({"eval": sae.meta["eval"]})
    sae.save(a.out)
    print(json.dumps(sae.meta["eval"]))
    out = os.path.splitext(a.out)[0] + ".concepts.json"
    from dictionary import describe
    describe(sae, model, a.layer, a.data_dir, a.eval_tokens, block_size=T, device=a.device, out=out)
    os.remove(resume_path)  # only now: a crash in evaluate or describe resumes at the end instead of retraining
    print(f"wrote {a.out}, {log_path}, {out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # expected failures read better as one line than a traceback
        raise SystemExit(f"error: {e}")
