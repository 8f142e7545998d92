"""
The GPT being trained, the frozen concept source, and the CoCoMix parts.

A plain GPT-2 (learned positions, pre-LayerNorm blocks, causal attention, GELU
MLP, LM head tied to the token embedding), in the layout and naming of
nanoGPT and Hugging Face's GPT-2 so that GPT-2 weights load directly.

With `n_concepts > 0` the model becomes a CoCoMix student (docs/method.md): at the
input of block `insert_layer` it predicts concept logits z from the standardised
hidden state (ConceptMixer.predict), keeps the `concept_topk` largest and
compresses them back to a d-vector c_t (ConceptMixer.compress), then interleaves

    h_1, c_1, h_2, c_2, ..., h_T, c_T

through the remaining blocks. The next token x_{t+1} is read from the concept
slot c_t (GPT.hidden_states). `pause=True` puts one learned vector in every
slot instead: the same architecture without concepts, the paper's pause baseline.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocomix.checkpoint import load_weights, read_checkpoint
from cocomix.ops import (
    causal_attention,
    concept_loss_reference,
    fused_concept_head,
    lm_loss,
    sparse_mix,
)
from cocomix.weights import GPT2_NAMES, copy_gpt2_weights, read_gpt2_config

MIX_MODES = ("interleave", "add", "none")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # GPT-2 BPE; no padding so logits match the concept source's
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    ln_eps: float = 1e-5
    # CoCoMix (0 concepts = plain GPT)
    n_concepts: int = 0  # C, the number of SAE latents the student predicts
    concept_topk: int = 32  # K, concepts kept per token for mixing
    insert_layer: int = 1  # concept head sits at the input of this block (0-based)
    mix: str = "interleave"  # interleave | add | none
    pause: bool = False  # the pause baseline: a learned vector in every concept slot, no concepts

    def __post_init__(self):
        # config errors are cheaper to read here than as a shape error deep inside forward
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.pause and (self.n_concepts or self.mix != "interleave"):
            raise ValueError("pause=True is the pause baseline: no concepts, interleaved slots")
        if self.has_insert_layer:
            if not 0 <= self.insert_layer < self.n_layer:
                raise ValueError(
                    f"insert_layer={self.insert_layer} is outside the model's {self.n_layer} blocks"
                )
            if self.n_concepts and not 0 < self.concept_topk <= self.n_concepts:
                raise ValueError(
                    f"concept_topk={self.concept_topk} must be in [1, n_concepts={self.n_concepts}]"
                )

    @property
    def has_insert_layer(self):
        """A CoCoMix student (concepts) or a pause model: block insert_layer's input is changed."""
        return self.n_concepts > 0 or self.pause

    @property
    def interleaved(self):
        """Two slots per token above insert_layer (h_t, c_t): mix interleave, or pause."""
        return self.has_insert_layer and self.mix == "interleave"


# -----------------------------------------------------------------------------
# The transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            # incremental decoding: the new positions attend to everything cached plus themselves
            k, v = kv_cache.update(k, v)
        Tk = k.size(2)
        if Tk == T:
            # PyTorch's fused causal attention (made plainly where that is faster, cocomix/ops.py)
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        else:  # T new queries after Tk - T cached keys: query i sees keys up to Tk - T + i
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class KVCache:
    """Keys and values (B, n_head, T, head_dim) of one attention layer for incremental decoding, in
    a buffer that grows by doubling so that a step writes only its new positions."""

    def __init__(self):
        self.k, self.v, self.n = None, None, 0  # n: positions held

    def update(self, k, v):
        n = self.n + k.size(2)
        if self.k is None or n > self.k.size(2):
            cap = max(n, 64, 2 * self.n)
            k_buf, v_buf = (t.new_empty(*t.shape[:2], cap, t.size(3)) for t in (k, v))
            if self.n:
                k_buf[:, :, : self.n], v_buf[:, :, : self.n] = (
                    self.k[:, :, : self.n],
                    self.v[:, :, : self.n],
                )
            self.k, self.v = k_buf, v_buf
        self.k[:, :, self.n : n], self.v[:, :, self.n : n] = k, v
        self.n = n
        return self.k[:, :, :n], self.v[:, :, :n]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's own GELU is the tanh approximation; the exact erf form would shift its logits
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# CoCoMix parts


def standardise(h, eps=1e-5):
    """x = (h - mu) / (std + eps) per token, std Bessel-corrected: (x, mu, std), each (..., d) or
    (..., 1). Shared by the SAE and the concept head (docs/method.md#per-token-standardisation)."""
    mu = h.mean(dim=-1, keepdim=True)
    std = h.std(dim=-1, keepdim=True)  # Bessel-corrected, as the SAE's
    return (h - mu) / (std + eps), mu, std


class ConceptMixer(nn.Module):
    """The student's two concept maps, both on the standardised hidden state of block insert_layer:
    predict  z = W_pred (x - b_pre) + b_pred                  concept logits, B x T x C
    compress c = (W_cmp TopK(z) + b_cmp + b_pre) * std + mu    back to width d, in the units of h
    where x, mu, std = standardise(h) (docs/method.md, "Concept prediction and compression").
    With mix='none' (prediction only) there is no compression: a parameter that never gets a
    gradient would also stop DDP at its second step."""

    def __init__(self, config):
        super().__init__()
        d, C = config.n_embd, config.n_concepts
        self.k = 0 if config.mix == "none" else config.concept_topk  # none: nothing to mix
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.concept_head = nn.Linear(d, C)  # W_pred, b_pred
        if config.mix != "none":
            self.W_cmp_T = nn.Parameter(torch.empty(C, d))  # W_cmp transposed: a concept is one row
            self.b_cmp = nn.Parameter(torch.zeros(d))

    def predict(self, x, steer=None, labels=None, fused=False):
        """(z, TopK_k(z)'s values and indices, L_concept at the labels or None). Steering scales
        z[..., i] by steer[i] before the TopK. fused (training): one op computes the same values and
        L_concept without keeping z (cocomix/ops.py, fused_concept_head), and z is None."""
        x = x - self.b_pre
        if fused and labels is not None and not steer:
            W, b = self.concept_head.weight, self.concept_head.bias
            return None, *fused_concept_head(x, W, b, self.k, labels)
        z = self.concept_head(x)
        if steer:
            z = steer_logits(z, steer)
        values, indices = torch.topk(z, self.k, dim=-1)  # raw logits: no ReLU, no softmax
        return z, values, indices, None if labels is None else concept_loss_reference(z, labels)

    def compress(self, values, indices, mu, std):
        # sum_k values_k W_cmp[:, indices_k] without the dense B x T x C masked matrix
        # (cocomix/ops.py)
        W = self.W_cmp_T
        c = sparse_mix(values.to(W.dtype), indices, W) + self.b_cmp + self.b_pre
        return c * std + mu


def steer_logits(z, steer):
    """The paper's steering: concept logits z[..., i] scaled by steer[i] before the TopK."""
    z = z.clone()
    for i, factor in steer.items():
        z[..., i] = z[..., i] * factor
    return z


def interleave(h, c):
    """h_1, c_1, h_2, c_2, ...: (B, T, d) x 2 -> (B, 2T, d) (docs/method.md#mixing)."""
    B, T, d = h.shape
    return torch.stack((h, c.to(h.dtype)), dim=2).view(B, 2 * T, d)


@torch.no_grad()
def concept_recall(z, labels):
    """Fraction of valid labels that are among the K_attr highest concept logits."""
    valid = labels >= 0
    top = z.topk(labels.size(-1), dim=-1).indices
    hit = (labels.unsqueeze(-1) == top.unsqueeze(-2)).any(-1) & valid
    return hit.sum().float() / valid.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if config.n_concepts > 0:
            self.mixer = ConceptMixer(config)
        if config.pause:
            self.pause = nn.Parameter(torch.zeros(config.n_embd))
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.n_concepts > 0 and config.mix != "none":
            torch.nn.init.normal_(self.mixer.W_cmp_T, mean=0.0, std=0.02)
        if config.pause:
            torch.nn.init.normal_(self.pause, mean=0.0, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx, pos_offset=0):
        """Token + position embeddings (B x T x d)."""
        T = idx.size(1)
        if pos_offset + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {pos_offset + T} is longer than "
                f"block_size={self.config.block_size}"
            )
        pos = torch.arange(pos_offset, pos_offset + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def mix_concepts(self, h, steer=None, labels=None, fused=False):
        """At the input of block insert_layer: (concept logits z, L_concept, the hidden state the
        blocks above see). z is None for a pause model and with fused (ConceptMixer.predict);
        L_concept is None without labels."""
        mix = self.config.mix
        if self.config.pause:
            return None, None, interleave(h, self.pause.expand_as(h))
        x, mu, std = standardise(h)
        z, values, indices, concept_loss = self.mixer.predict(x, steer, labels, fused)
        if mix == "none":  # concept prediction only
            return z, concept_loss, h
        c = self.mixer.compress(values, indices, mu, std)
        return z, concept_loss, interleave(h, c) if mix == "interleave" else h + c.to(h.dtype)

    def hidden_states(self, idx, steer=None, labels=None, fused=False):
        """idx (B, T) -> (final hidden states x (B, T, d) after ln_f, concept logits z (B, T, C) or
        None, L_concept at the labels (B, T, K_attr) or None). z is None for a plain GPT and with
        fused=True, the training path that never keeps z."""
        cfg = self.config
        x, z, concept_loss = self.embed(idx), None, None
        for i, block in enumerate(self.transformer.h):
            if cfg.has_insert_layer and i == cfg.insert_layer:
                z, concept_loss, x = self.mix_concepts(x, steer, labels, fused)
            x = block(x)
        if cfg.interleaved:
            x = x[
                :, 1::2
            ]  # the concept (or pause) slot c_t predicts x_{t+1}; token slots are discarded
        return self.transformer.ln_f(x), z, concept_loss

    def forward(self, idx, targets=None, steer=None):
        """nanoGPT's interface: idx (B, T) -> (logits (B, T, V), next-token loss or None). Training
        computes its loss from hidden_states instead, without the B x T x V logits (training_loss).
        """
        x, _, _ = self.hidden_states(idx, steer)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1
        )

    # -------------------------------------------------------------------------
    # a plain GPT's pass split at a block: the concept source (labels) and the SAE's host

    def forward_to(self, idx, layer):
        """Residual stream after block `layer` (0-based), B x T x d. Plain GPT only."""
        x = self.embed(idx)
        for block in self.transformer.h[: layer + 1]:
            x = block(x)
        return x

    def forward_from(self, h, layer):
        """Final hidden states (after ln_f) from the residual stream h after block `layer`."""
        for block in self.transformer.h[layer + 1 :]:
            h = block(h)
        return self.transformer.ln_f(h)

    def configure_optimizers(
        self, weight_decay, learning_rate, betas, device_type, decay_all=False
    ):
        # decay every 2D weight (matmuls, embeddings), not biases, LayerNorm gains or the d-vectors
        # (nanoGPT's rule); decay_all: every parameter, as the released CoCoMix trainer does
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 or decay_all]
        no_decay = [p for p in params if p.dim() < 2 and not decay_all]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # fused: one kernel over all parameters instead of ~7 ops per tensor (on a CPU, 15% of a
        # small step); eps is AdamW's default, 1e-8, the paper's
        return torch.optim.AdamW(
            groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu")
        )

    # -------------------------------------------------------------------------
    # loading GPT-2

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """GPT-2 from a local Hugging Face checkpoint folder (config.json plus model.safetensors or
        pytorch_model.bin), or 'gpt2' to download it when online. No `transformers` needed."""
        hf, path = read_gpt2_config(path)
        model = cls(
            GPTConfig(
                block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"],
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                ln_eps=hf.get("layer_norm_epsilon", 1e-5),
                bias=True,
                **overrides,
            )
        )
        copy_gpt2_weights(model, path)
        return model

    @torch.no_grad()
    def forward_step(self, idx, caches, steer=None, last_only=False):
        """The new tokens idx (B, T) after those held in `caches` (one KVCache per block, extended
        here); above insert_layer an interleaved model adds two slots (h_t, c_t) per token, while
        positions count tokens. Returns (logits (B, T or 1, V), z of the new tokens or None)."""
        cfg = self.config
        x, z = self.embed(idx, caches[-1].n // (2 if cfg.interleaved else 1)), None
        for i, (block, cache) in enumerate(zip(self.transformer.h, caches)):
            if cfg.has_insert_layer and i == cfg.insert_layer:
                # per token: the new tokens' c_t need no cache
                z, _, x = self.mix_concepts(x, steer)
            x = block(x, cache)
        x = x[:, 1::2] if cfg.interleaved else x
        return self.lm_head(self.transformer.ln_f(x[:, -1:] if last_only else x)), z

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, steer=None, use_cache=True, shift=0
    ):
        """Sample max_new_tokens tokens after idx (B, T). use_cache: each step runs only the newest
        token (KV cache), else the whole window is recomputed. Past block_size tokens every learned
        position moves as the window slides: shift=0 then recomputes the last block_size tokens per
        step, as the uncached path does; shift=s > 0 rebuilds the cache from the last block_size - s
        tokens and goes on cached for s steps (faster, shorter context)."""
        bs, caches = self.config.block_size, None
        if not 0 <= shift < bs:
            raise ValueError(f"shift={shift} must be in [0, block_size={bs})")
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if (
                use_cache
                and caches is not None
                and caches[-1].n < (2 if self.config.interleaved else 1) * bs
            ):
                logits, _ = self.forward_step(idx[:, -1:], caches, steer, last_only=True)
            elif use_cache and (T <= bs or shift):
                caches = [KVCache() for _ in self.transformer.h]
                logits, _ = self.forward_step(
                    idx[:, -(T if T <= bs else bs - shift) :], caches, steer, last_only=True
                )
            else:
                logits, _ = self(idx[:, -bs:], steer=steer)
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx


def ntp_matched_width(config):
    """The plain-GPT width (a multiple of n_head) whose parameter count is closest to the CoCoMix
    student's, for the paper's parameter-matched NTP baseline (the paper widens 512 to 624; this
    count gives 712, docs/method.md)."""
    if not config.has_insert_layer:
        return config.n_embd
    target = GPT(config).get_num_params()  # non-embedding: without the position table, as count()

    def count(d):  # token embedding (tied with lm_head), blocks, final LayerNorm
        L, V = config.n_layer, config.vocab_size
        return V * d + L * (12 * d * d + 13 * d) + 2 * d

    widths = range(config.n_head, 4 * config.n_embd + 1, config.n_head)
    return min(widths, key=lambda d: abs(count(d) - target))


# -----------------------------------------------------------------------------
# The loss of every mode (docs/method.md, "The objective")
#   ntp, pause   L = CE(next token)
#   cocomix      L = CE(next token) + lam * L_concept        L_concept: CE of z at the K_attr labels
#   kd           L = CE(next token) + lam_kd * KL(p_teacher || p_student)
# The next-token CE comes from x in row chunks (cocomix/ops.py, lm_loss), never holding the B x T x
# V logits; KD makes the teacher's logits in the same chunks. Its plain form is lm_loss_reference.


def training_loss(
    model,
    X,
    Y,
    mode,
    labels=None,
    teacher=None,
    lam=0.1,
    lam_kd=0.1,
    recall=False,
    head_loss=lm_loss,
):
    """(loss, parts) of one micro-batch; parts holds the detached terms ('ntp', 'concept', 'kd').
    labels: B x T x K_attr concept labels (cocomix); teacher: (final hidden states, head weight) of
    the KD teacher. recall=True (evaluation) also measures the concept recall@K_attr, which needs z:
    the plain concept head runs then, the fused one otherwise."""
    x, z, concept_loss = model.hidden_states(
        X, labels=labels if mode == "cocomix" else None, fused=not recall
    )
    W = model.lm_head.weight
    if mode == "kd":  # CE + lam_kd * KL, the teacher's logits made in the same row chunks
        loss, ntp, kd = head_loss(x, W, Y, teacher=teacher, lam_kd=lam_kd)
        return loss, {"ntp": ntp, "kd": kd}
    ntp = head_loss(x, W, Y)
    if mode != "cocomix":
        return ntp, {"ntp": ntp.detach()}
    loss = ntp + lam * concept_loss  # the paper's objective
    parts = {"ntp": ntp.detach(), "concept": concept_loss.detach()}
    if recall:
        parts["recall"] = concept_recall(z, labels)
    return loss, parts


class Objective(nn.Module):
    """training_loss as a module around the model, so that DDP wraps (and torch.compile compiles)
    the whole loss as one forward. Recall is measured in eval mode only (2% of a CPU step)."""

    def __init__(self, model, mode, lam=0.1, lam_kd=0.1):
        super().__init__()
        self.model, self.mode, self.lam, self.lam_kd = model, mode, lam, lam_kd

    def forward(self, X, Y, labels=None, teacher=None):
        return training_loss(
            self.model,
            X,
            Y,
            self.mode,
            labels,
            teacher,
            self.lam,
            self.lam_kd,
            recall=not self.training,
        )


def teacher_of(source, idx):
    """What KD's loss takes as the teacher: its final hidden states and head weight, from which
    lm_loss makes the teacher's logits a chunk of rows at a time."""
    return source.forward_from(source.embed(idx), -1), source.lm_head.weight


# -----------------------------------------------------------------------------
# Loading: train.py's checkpoints and the frozen plain GPTs (concept source, SAE host, KD teacher).
# The file checks, each a one-line error, are in cocomix/checkpoint.py.


def load_checkpoint(path, device="cpu"):
    """A model saved by train.py: returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, GPTConfig.__dataclass_fields__, device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    load_weights(model, ckpt["model"], path)
    return model.to(device), ckpt


def load_frozen_gpt(path, device="cpu"):
    """A frozen plain GPT: our ckpt.pt or its folder, a Hugging Face GPT-2 folder, a GPT-2 name."""
    if path in GPT2_NAMES or os.path.exists(os.path.join(path, "config.json")):
        model = GPT.from_pretrained(path)
    else:
        model, _ = load_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)
    if model.config.has_insert_layer:
        raise ValueError(
            f"{path}: a concept source or SAE host must be a plain GPT, not a CoCoMix student"
        )
    return model.to(device).eval().requires_grad_(False)


def sample_next(logits, temperature=1.0, top_k=None):
    """One token per row from the last position's logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
