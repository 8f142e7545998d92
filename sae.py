"""
TopK sparse autoencoder (Gao et al. 2024) on the residual stream of a GPT after block `layer`
(docs/method.md, "The sparse autoencoder"). Parameter names follow OpenAI's sparse_autoencoder so
their GPT-2 SAEs load directly.

    x, mu, std = standardise(h)                    per token, Bessel std, eps 1e-5
    pre   = W_enc (x - b_pre) + b_lat              encoder.weight is C x d
    a     = ReLU(TopK_k(pre))                      k non-zero latents per token
    x_hat = W_dec a + b_pre                        decoder.weight is d x C, unit-norm columns
    h_hat = x_hat * std + mu

Train on a GPT checkpoint's activations, evaluate (both in cocomix/sae_train.py), and describe the
latents (cocomix/dictionary.py):

    python sae.py --concept_source=out/source/ckpt.pt --data_dir=data/gutenberg --layer=2 \
        --sae_path=out/source/sae.pt
    python sae.py --eval_only --sae_path=out/source/sae.pt --data_dir=data/gutenberg
    python sae.py --describe --sae_path=out/source/sae.pt --data_dir=data/gutenberg
"""

import json
import os

from cocomix.interrupt import on_ctrl_c

if __name__ == "__main__":  # Ctrl-C in the start-up (the imports below): one line, exit 130
    on_ctrl_c("no file half-written; a training run keeps its resume file")

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocomix.corpus import TokenizerError, load_tokens
from cocomix.dictionary import describe
from cocomix.ops import lm_loss, sparse_mix
from cocomix.runtime import hold_lock, keep_freed_memory
from cocomix.sae_cli import (
    arg_parser,
    check_args,
    out_file,
    read_resume,
    resume_key,
    run_settings,
    usable,
)
from cocomix.sae_train import (
    ShuffleBuffer,
    activation_chunk,
    evaluate_sae,
    geometric_median,
    train_sae,
)
from cocomix.weights import (
    download_openai_sae,
    first_line,
    load_torch_file,
    openai_name,
    save_atomic,
    source_sha256,
)
from model import load_frozen_gpt, standardise

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
            self.normalise_decoder()
            self.encoder.weight.copy_(self.decoder.weight.t())

    @property
    def W_dec_T(self):
        """W_dec transposed (C x d): a latent's direction is one row to gather."""
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
        """W_dec a as a gather of the k chosen decoder columns, weighted by their values (never a
        dense N x C a). The C x d copy is contiguous because embedding_bag on the transposed view is
        ~50x slower."""
        return sparse_mix(values, indices, self.W_dec_T.contiguous())

    def decode_sparse(self, values, indices):
        """x_hat = W_dec a + b_pre."""
        return self.decode_latents(values, indices) + self.pre_bias

    def forward(self, h):
        """h (..., d) -> (h_hat, values, indices), h_hat in the units of h."""
        values, indices, mu, std = self.encode(h)
        x_hat = self.decode_sparse(values, indices)
        return x_hat * std + mu, values, indices

    # -------------------------------------------------------------------------
    # the decoder's constraint: unit-norm columns, kept by every training step

    @torch.no_grad()
    def normalise_decoder(self):
        """Unit-norm decoder columns, so latent magnitudes live in the activations, not the
        dictionary."""
        W = self.decoder.weight
        W.div_(W.norm(dim=0, keepdim=True).clamp(min=1e-12))

    @torch.no_grad()
    def project_decoder_grad(self):
        """Drop each column's gradient component along the column: the step then only rotates it."""
        W, g = self.decoder.weight, self.decoder.weight.grad
        if g is not None:
            g.sub_((g * W).sum(dim=0, keepdim=True) * W)

    # -------------------------------------------------------------------------
    # files

    def save(self, path):
        """Our format, written atomically so a crash never leaves a half-written SAE behind."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        obj = {
            "state_dict": self.state_dict(),
            "d": self.d,
            "n_latents": self.n_latents,
            "k": self.k,
            "meta": self.meta,
        }
        save_atomic(obj, path)

    @classmethod
    def load(cls, path, map_location="cpu", layer=None):
        """Our files, OpenAI's GPT-2 SAE state dicts, or 'openai:<location>/<layer>' (downloaded).
        `layer` fills in the host layer for OpenAI files, whose state dicts do not record it."""
        host = None
        if name := openai_name(path):
            if layer is not None and layer != name[1]:
                raise ValueError(
                    f"{path} is OpenAI's SAE for layer {name[1]}, but layer={layer} was asked for"
                )
            layer = name[1]
            path, host = download_openai_sae(path), "gpt2"
        obj = load_torch_file(path, "SAE file", map_location)
        if isinstance(obj, dict) and "state_dict" in obj and "n_latents" in obj:
            sae = cls._from_ours(obj, path)
        elif isinstance(obj, dict) and "encoder.weight" in obj:
            sae = cls._from_openai(obj, path)
        else:
            raise ValueError(
                f"{path}: not an SAE file (neither our 'state_dict' format nor OpenAI's "
                "'encoder.weight' keys)"
            )
        if host is not None:  # the paper's SAEs were trained on GPT-2 small
            sae.meta.setdefault("host", host)
        if layer is not None:
            if sae.meta.get("layer") not in (None, layer):
                raise ValueError(
                    f"{path}: the file says layer {sae.meta['layer']}, "
                    f"but layer={layer} was asked for"
                )
            sae.meta["layer"] = layer
        sae.path = path
        return sae.to(map_location)

    @classmethod
    def _from_ours(cls, obj, path):
        try:
            sae = cls(int(obj["d"]), int(obj["n_latents"]), int(obj["k"]), obj.get("meta"))
            sae.load_state_dict(obj["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: malformed SAE file ({first_line(e)})") from None
        return sae

    @classmethod
    def _from_openai(cls, sd, path):
        act = sd.get("activation")
        if act != "TopK":
            raise ValueError(
                f"{path}: OpenAI SAE with activation {act!r}; only TopK SAEs are supported"
            )
        act_sd = sd.get("activation_state_dict", {})
        if (
            not isinstance(act_sd, dict)
            or "k" not in act_sd
            or act_sd.get("postact_fn", "ReLU") != "ReLU"
        ):
            raise ValueError(
                f"{path}: OpenAI TopK SAE without k or with a non-ReLU postact_fn ({act_sd!r})"
            )
        try:
            C, d = sd["encoder.weight"].shape
            expected = {
                "pre_bias": (d,),
                "latent_bias": (C,),
                "encoder.weight": (C, d),
                "decoder.weight": (d, C),
            }
            for key, shape in expected.items():
                if tuple(sd[key].shape) != shape:
                    raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, expected {shape}")
            # trained on LN-style standardised inputs, as ours; the statistics buffers are not
            # weights
            sae = cls(
                d,
                C,
                int(act_sd["k"]),
                {
                    "source": "openai",
                    "file": os.path.abspath(path),
                    "d": d,
                    "tokenizer": "gpt2",
                    "layer": None,
                },
            )
            sae.load_state_dict({key: sd[key].float() for key in expected})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: malformed OpenAI SAE state dict ({first_line(e)})") from None
        return sae

    def check_host(self, host, layer):
        """Refuse a concept source (GPT, GPTConfig or model_args) of another width or layer."""
        cfg = getattr(host, "config", host)
        d = cfg["n_embd"] if isinstance(cfg, dict) else cfg.n_embd
        trained = self.meta.get("layer")
        if d != self.d or (trained is not None and trained != layer):
            where = (
                f"layer {trained} of a d={self.d} model"
                if trained is not None
                else f"a d={self.d} model (layer unknown)"
            )
            raise ValueError(
                f"SAE {self.path or '(in memory)'} was trained on {where}; "
                f"the concept source has d={d} at layer {layer}"
            )


# -----------------------------------------------------------------------------
# Concept labels by attribution (docs/method.md, "Concept labels by attribution")
#
#     s_j = a_j * (g . W_dec[:, j])        g = dL/dh_con, at the active latents only
#
# A token's labels are its K_attr active latents with the largest s. `fill` says what fills the
# labels of a token with fewer than K_attr positive scores: none (-1, skipped by the concept loss),
# active (the next active latents by score), released (the released code's top-k over all C latents,
# where inactive latents score +0 or -0, ranked as on the GPU its runs used). The SAE encoding and
# the scores run in fp32 whatever the training precision. A window's labels depend on nothing that
# training changes, so cocomix/label_cache.py keeps them on disk for later runs.

LABEL_RULES = ("attribution", "attribution_pre", "neg_attribution", "abs_attribution", "activation")
LABEL_FILLS = ("none", "active", "released")


def gathered_dot(W, indices, g, chunk=1024):
    """(W[indices] . g) for rows W (C x d), indices (..., K), g (..., d) -> (..., K), in token
    chunks so the tokens x K x d gathered rows never exist all at once."""
    K, d = indices.size(-1), g.size(-1)
    flat_i, flat_g = indices.reshape(-1, K), g.reshape(-1, d)
    out = torch.empty(flat_i.shape, dtype=g.dtype, device=g.device)
    for s in range(0, flat_i.size(0), chunk):
        out[s : s + chunk] = torch.bmm(
            W[flat_i[s : s + chunk]], flat_g[s : s + chunk].unsqueeze(2)
        ).squeeze(2)
    return out.view(indices.shape)


class ConceptLabeler:
    """Per batch: top-K_attr concept labels (B, T, K_attr), filled by `fill` where a token has too
    few."""

    def __init__(self, source, sae, layer, k_attr=4, rule="attribution", fill="none"):
        if rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {rule!r}")
        if fill not in LABEL_FILLS:
            raise ValueError(f"label_fill must be one of {LABEL_FILLS}, got {fill!r}")
        if not 0 <= layer < source.config.n_layer:
            raise ValueError(
                f"sae_layer={layer} is outside the concept source's {source.config.n_layer} blocks"
            )
        if not 0 < k_attr <= sae.k:
            raise ValueError(f"k_attr={k_attr} must be in [1, the SAE's k={sae.k}]")
        sae.check_host(source, layer)
        self.source, self.sae, self.layer, self.k_attr, self.rule, self.fill = (
            source,
            sae,
            layer,
            k_attr,
            rule,
            fill,
        )

    def hidden_and_grad(self, idx, targets):
        """h_con after block `layer` and g = dL/dh_con, for L the sum over windows of each window's
        mean next-token loss (so that a window's labels do not depend on the rest of the batch)."""
        with torch.no_grad():  # blocks below the SAE layer need no graph
            h = self.source.forward_to(idx, self.layer)
        if self.rule == "activation":
            return h, None
        h = h.detach().requires_grad_(True)
        src = self.source
        with torch.enable_grad():
            x = src.forward_from(h, self.layer)
            # The LM head's loss in chunks (lm_loss): the B x T x V logits never exist. One mean per
            # window, summed: a window's gradient then does not depend on the other windows in the
            # batch, so LabelCache's labels equal those of any batch. A positive scale per window
            # changes no ranking.
            loss = sum(
                lm_loss(xb, src.lm_head.weight, tb)
                for xb, tb in zip(x.unbind(0), targets.unbind(0))
            )
            # activation gradient only: no parameter grads exist
            (g,) = torch.autograd.grad(loss, h)
        return h.detach(), g

    @torch.no_grad()
    def scores(self, h, g):
        """Scores of the K_sae active latents: (values, indices, s), each (..., K_sae), in fp32
        whatever the training precision (bf16 would reorder a few percent of the labels)."""
        with torch.autocast(h.device.type, enabled=False):
            sae, h = self.sae, h.float()
            values, indices, mu, std = sae.encode(h)
            if self.rule == "activation":
                return values, indices, values
            # g . W_dec at the active latents only: gather K_sae decoder rows, not a dense tokens x
            # C product
            gW = gathered_dot(sae.W_dec_T.contiguous(), indices, g.float())
            # the paper's equation: pre-activations, not post-TopK latents
            if self.rule == "attribution_pre":
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
        # among the active latents
        top, pos = s.masked_fill(values <= 0, float("-inf")).topk(self.k_attr, dim=-1)
        labels = indices.gather(-1, pos).masked_fill(torch.isinf(top), -1)
        if self.fill == "none":
            return labels.masked_fill(top <= 0, -1)
        if self.fill == "released":  # tokens short of positive scores: top-k over all C latents
            short = (top <= 0).any(-1)
            # an inactive latent j scores (g . W_dec_j) * 0: +0.0 or -0.0, which a GPU ranks apart
            dense = torch.zeros(int(short.sum()), self.sae.n_latents, device=s.device)
            if g is not None and self.rule != "abs_attribution":
                dense *= (-1 if self.rule == "neg_attribution" else 1) * (
                    g[short].float() @ self.sae.W_dec_T.t()
                )
            labels[short] = topk_as_cuda(dense.scatter_(-1, indices[short], s[short]), self.k_attr)
        return labels


def topk_as_cuda(x, k):
    """torch.topk(x, k).indices as PyTorch's CUDA kernel picks them, on any device: it compares
    floats by their bits, so +0.0 ranks above -0.0 (a CPU calls them equal), and takes equal values
    lowest index first. One unique int64 key per entry makes the choice the same everywhere."""
    bits = x.float().view(torch.int32).long()
    # in the floats' order, the sign of zero included: -0.0 -> -1, +0.0 -> 0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    lower_first = 2**32 - 1 - torch.arange(x.size(-1), device=x.device)
    return (key * 2**32 + lower_first).topk(k, dim=-1).indices


def make_labeler(source, sae_path, sae_layer, k_attr, label_rule, label_fill, n_concepts, device):
    """The attribution labeler from the concept source and an SAE file: (labeler, C)."""
    sae = SAE.load(sae_path, layer=sae_layer if sae_layer >= 0 else None).to(device)
    if sae.meta.get("layer") is None:
        raise ValueError(f"{sae_path} does not say which layer it was trained on: pass --sae_layer")
    if n_concepts and n_concepts != sae.n_latents:
        raise ValueError(f"n_concepts={n_concepts} but the SAE has {sae.n_latents} latents")
    return ConceptLabeler(
        source, sae, sae.meta["layer"], k_attr, label_rule, label_fill
    ), sae.n_latents


def check_sae_host(sae, source_path):
    """Refuse an SAE trained on another concept source: sae.py records the SHA-256 of its host's
    file, and another model of the same width and layer has another residual stream."""
    want = sae.meta.get("host_sha256")
    if not want or not source_path:  # OpenAI's SAEs record none
        return
    if (have := source_sha256(source_path)) != want:
        raise ValueError(
            f"SAE {sae.path} was trained on {sae.meta.get('host')} (sha256 {want[:12]}), "
            f"not on the concept source {source_path} (sha256 {have[:12]}): "
            "pass the concept source it was trained on"
        )


# -----------------------------------------------------------------------------
# Command line (its flags, their checks and the resume file are in cocomix/sae_cli.py)


def eval_or_describe(a):
    """--eval_only / --describe: an existing SAE (ours, OpenAI's or 'openai:...') on the host it was
    trained on."""
    sae = SAE.load(a.sae_path, map_location=a.device, layer=a.layer)
    layer, source = sae.meta.get("layer"), a.concept_source or sae.meta.get("host")
    if layer is None or source is None:
        raise SystemExit(
            f"error: {sae.path} does not record its host and layer; "
            "pass --concept_source and --layer"
        )
    model = load_frozen_gpt(source, a.device)
    sae.check_host(model, layer)
    check_sae_host(sae, source)
    # the windows it was trained on
    block_size = a.block_size or sae.meta.get("train", {}).get("block_size")
    if a.describe:
        out = os.path.splitext(sae.path)[0] + ".concepts.json"
        describe(
            sae,
            model,
            layer,
            a.data_dir,
            a.eval_tokens,
            block_size=block_size,
            device=a.device,
            out=out,
        )
        print(f"wrote {out}")
    if a.eval_only:
        print(
            json.dumps(
                evaluate_sae(
                    sae, model, layer, a.data_dir, a.eval_tokens, a.host_batch, block_size, a.device
                )
            )
        )


def activation_buffer(a, model, T, saved):
    """The shuffled stream of the host's activations after block --layer on the training tokens, as
    saved if resuming."""
    data = load_tokens(a.data_dir, "train", min_tokens=T, need="block_size")
    chunk = lambda c: standardise(
        activation_chunk(model, a.layer, data, T, a.host_batch, a.seed, c, a.device)
    )[0]
    return ShuffleBuffer(
        chunk,
        a.host_batch * T,
        a.buffer,
        a.batch_size,
        torch.Generator().manual_seed(a.seed),
        saved and saved["buffer"],
    )


def fit(a, sae, model, settings, same, saved):
    """Train `sae` (from `saved` when resuming), logging to <sae>.metrics.jsonl and saving
    <sae>.resume.pt as it goes, then evaluate it into its meta. Returns the last training metrics,
    with "stopped" if a signal ended it."""
    resume_path = out_file(a, ".resume.pt")
    buffer = activation_buffer(a, model, settings["block_size"], saved)
    if saved is None:
        # b_pre at the data's centre, so the encoder starts by looking at deviations from it
        with torch.no_grad():
            sae.pre_bias.copy_(geometric_median(buffer.pool[: min(len(buffer.pool), 32768)]))

    # to a temporary file, then renamed: a crash while writing keeps the previous one
    def checkpoint(state):
        save_atomic({"settings": same, "train": state, "buffer": buffer.state_dict()}, resume_path)

    os.makedirs(os.path.dirname(os.path.abspath(a.sae_path)), exist_ok=True)
    # after a resume, steps since the last save appear twice, identically
    with open(out_file(a, ".metrics.jsonl"), "a") as f:
        log = lambda m: (f.write(json.dumps(m) + "\n"), f.flush())
        log({"settings": settings} if saved is None else {"resume": saved["train"]["step"]})
        m = train_sae(
            sae,
            buffer,
            settings["steps"],
            settings["lr"],
            settings["dead_tokens"],
            a.k_aux,
            a.aux_coef,
            log=log,
            log_interval=a.log_interval,
            state=saved and saved["train"],
            checkpoint=checkpoint,
            ckpt_interval=a.ckpt_interval,
        )
        # no wall time in the file: the same training gives the same bytes (and label cache)
        if "stopped" not in m:
            sae.meta["train_final"] = {k: v for k, v in m.items() if k != "time"}
            sae.meta["eval"] = evaluate_sae(
                sae,
                model,
                a.layer,
                a.data_dir,
                a.eval_tokens,
                a.host_batch,
                settings["block_size"],
                a.device,
            )
            log({"eval": sae.meta["eval"]})
    return m


def main(argv=None):
    """Train an SAE on a host's activations, evaluate and describe it; or, with --eval_only /
    --describe, an existing one."""
    a = arg_parser().parse_args(argv)
    if problem := check_args(a):
        raise SystemExit(f"error: {problem}")
    torch.manual_seed(a.seed)
    keep_freed_memory(a.device)  # as train.py does (cocomix/runtime.py)
    if a.eval_only or a.describe:
        return eval_or_describe(a)
    if a.concept_source is None or a.layer is None:
        raise SystemExit("error: training needs --concept_source and --layer")
    model = load_frozen_gpt(a.concept_source, a.device)
    cfg = model.config
    if not 0 <= a.layer < cfg.n_layer:
        raise SystemExit(f"error: --layer={a.layer} is outside the host's {cfg.n_layer} blocks")
    if (a.block_size or 0) > cfg.block_size:
        raise SystemExit(
            f"error: --block_size={a.block_size} is longer "
            f"than the host's context ({cfg.block_size})"
        )
    settings, meta = run_settings(a, cfg)
    same, resume_path = resume_key(settings, meta), out_file(a, ".resume.pt")
    try:  # one training per --sae_path: two would overwrite each other's resume file
        release = hold_lock(out_file(a, ".lock"))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        train_and_write(a, model, cfg, settings, meta, same, resume_path)
    finally:
        release()


def train_and_write(a, model, cfg, settings, meta, same, resume_path):
    """Train the SAE (resuming from <sae>.resume.pt when there is one), then write it and its
    dictionary."""
    # before anything is written, so a refusal leaves every file as it was
    saved = read_resume(resume_path, same)
    sae = SAE(cfg.n_embd, a.n_latents, a.k, meta).to(a.device)
    sae.path = a.sae_path
    m = fit(a, sae, model, settings, same, saved)
    if "stopped" in m:
        print(
            f"stopped at step {m['stopped']} of {settings['steps']}; run the same command to "
            f"resume from {resume_path}"
        )
        raise SystemExit(130)  # stopped by Ctrl-C or SIGTERM: a shell's status for it
    # e.g. a far too large --lr: say so rather than hand on a useless SAE
    if problem := usable(sae.meta["eval"]):
        # a finished run: nothing to resume, and a rerun with a lower --lr must not be refused
        os.remove(resume_path)
        raise SystemExit(
            f"error: the trained SAE is unusable ({problem}); not written to {a.sae_path}: lower "
            f"--lr (it was {settings['lr']:.3g}) or check the host"
        )
    sae.save(a.sae_path)
    print(json.dumps(sae.meta["eval"]))
    out = out_file(a, ".concepts.json")
    describe(
        sae,
        model,
        a.layer,
        a.data_dir,
        a.eval_tokens,
        block_size=settings["block_size"],
        device=a.device,
        out=out,
    )
    # only now: a crash in evaluate or describe resumes at the end instead of retraining
    os.remove(resume_path)
    print(f"wrote {a.sae_path}, {out_file(a, '.metrics.jsonl')}, {out}")


if __name__ == "__main__":
    try:
        main()
    # expected failures (bad files, a full disk, no tokenizer files) read better as one line
    except (ValueError, OSError, TokenizerError) as e:
        raise SystemExit(f"error: {e}")
