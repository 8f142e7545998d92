"""
Concept steering and its measurement, for sample.py.

Two ways to steer: the student's predicted concept logit z[..., ID] scaled by a factor (GPT.generate's
steer), or SAE latent ID of the concept source scaled before the SAE's TopK (SourceSteering). The
measurement counts how often one concept fires in text generated with and without the steer, with the
same seed per prompt in both conditions (paired), read three ways: by the SAE on the concept source, by
the concept's top tokens in the dictionary, and by the student's own TopK.
"""

import os
from contextlib import nullcontext

import torch

from checkpoint import load_frozen_gpt
from corpus import tokenizer
from dictionary import concept_name, load_concepts
from inspect_html import concept_logits, has_concept_head, token_text, windowed
from sae import SAE, sae_file
from train_utils import check_sae_host

STEER_RANGE = 10.0  # |factor| <= 10, as the paper's steering experiments
EOT = "<|endoftext|>"


class UsageError(Exception):
    pass


def check_steerable(model, flag):
    """A UsageError unless steering the student's concept logits can change what it generates."""
    if not has_concept_head(model):
        raise UsageError(f"{flag} needs a model with a concept head (a CoCoMix checkpoint with n_concepts > 0)")
    if model.config.mix == "none":
        raise UsageError(f"{flag}: this student (mix='none') predicts concepts but never mixes them back into its "
                         "hidden states, so steering them changes nothing it generates")


def parse_steer(specs, n_latents, what):
    """['3:2.5,7:-1', '9:4'] -> {3: 2.5, 7: -1.0, 9: 4.0}, checked against n_latents and [-10, 10]."""
    steer = {}
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                i, f = item.split(":")
                i, f = int(i), float(f)
            except ValueError:
                raise UsageError(f"{what}: expected ID:FACTOR, got {item!r}") from None
            if not 0 <= i < n_latents:
                raise UsageError(f"{what}: concept id {i} is outside [0, {n_latents})")
            if not -STEER_RANGE <= f <= STEER_RANGE:
                raise UsageError(f"{what}: factor {f} for concept {i} is outside [-{STEER_RANGE:g}, {STEER_RANGE:g}]")
            steer[i] = f
    return steer


def encode_prompt(enc, text, vocab_size):
    ids = enc.encode(text, allowed_special={EOT}) or [enc.eot_token]
    if max(ids) >= vocab_size:
        raise UsageError(f"the prompt has token {max(ids)}, outside the model's vocabulary of {vocab_size}")
    return ids


def generate(model, ids, args, steer=None, ctx=nullcontext(), seed=None):
    """num_samples continuations of the prompt ids, one batch, reseeded so runs compare like for like:
    sampling draws its noise in a fixed pattern, so two runs with one seed share their random numbers."""
    torch.manual_seed(args.seed if seed is None else seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    with ctx:
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             steer=steer or None, use_cache=not args.no_cache, shift=args.shift)
    return out.tolist()


# -----------------------------------------------------------------------------
# the concept source and its SAE


def load_sae(path, device="cpu"):
    return SAE.load(path, map_location=device)


def load_source_and_sae(args, train_config, model, what="--steer_source"):
    """(concept source, SAE, layer, sae_path) from the flags, else from the checkpoint's training config."""
    sae_path = args.sae_path or train_config.get("sae_path", "")
    if not sae_path:
        raise UsageError(f"{what} needs --sae_path (or a checkpoint trained with one)")
    sae = load_sae(sae_path, args.device)
    layer = args.sae_layer if args.sae_layer >= 0 else sae.meta.get("layer")
    if layer is None or layer < 0:
        layer = train_config.get("sae_layer", -1)
    if layer is None or layer < 0:
        raise UsageError(f"{sae_path} does not record its layer: pass --sae_layer")
    src_path = args.concept_source or train_config.get("concept_source", "") or sae.meta.get("host") or ""
    if src_path:
        source = load_frozen_gpt(src_path, args.device)
    elif not model.config.has_insert_layer:
        source = model  # a plain GPT is its own concept source
    else:
        raise UsageError(f"{what} needs --concept_source (the plain GPT the SAE reads)")
    sae.check_host(source, layer)
    if src_path:  # the same width and layer are not enough: the SAE records its host's file hash
        check_sae_host(sae, src_path)
    if not 0 <= layer < source.config.n_layer:
        raise UsageError(f"SAE layer {layer} is outside the concept source's {source.config.n_layer} blocks")
    return source, sae, layer, sae_path


def concepts_path(args, sae_path):
    if args.concepts:
        return args.concepts
    sae_path = sae_file(sae_path)  # an OpenAI name: its downloaded file, which sae.py --describe wrote next to
    for p in (sae_path + ".concepts.json", os.path.splitext(sae_path)[0] + ".concepts.json") if sae_path else ():
        if os.path.exists(p):
            return p
    return ""


def sae_steer_delta(sae, h, steer):
    """The change of the SAE reconstruction when the chosen latents' pre-activations are scaled
    before the TopK, in the units of h: h_hat_steered - h_hat (the SAE's error term is kept)."""
    x, mu, std = sae.standardise(h.float())
    pre = sae.encode_pre(x)
    pre_s = pre.clone()
    for i, f in steer.items():
        pre_s[..., i] = pre_s[..., i] * f
    decode = lambda p: sae.decode_sparse(*sae.topk(p))
    return ((decode(pre_s) - decode(pre)) * std).to(h.dtype)


class SourceSteering:
    """A forward hook on block `layer` of a plain GPT: h -> h + (h_hat_steered - h_hat). It acts per
    token, so cached and uncached generation see the same intervention."""

    def __init__(self, model, sae, layer, steer):
        self.block, self.sae, self.steer, self.handle = model.transformer.h[layer], sae, steer, None

    def __enter__(self):
        if self.steer:
            self.handle = self.block.register_forward_hook(lambda mod, inp, h: h + sae_steer_delta(self.sae, h, self.steer))
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


# -----------------------------------------------------------------------------
# measuring steering: how often one concept fires in the generated text, steered vs not

DEFAULT_PROMPTS = ["The", "In the morning", "Once upon a time", "It was", "I think that", "The first thing",
                   "She said", "After a while"]  # short and neutral, so the concept is not already in the prompt


def read_prompts(path, n):
    """The first n non-empty lines of a text file, or the default prompts."""
    if not path:
        return DEFAULT_PROMPTS[:n]
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()][:n]
    if not lines:
        raise UsageError(f"{path} has no non-empty line to use as a prompt")
    return lines


@torch.no_grad()
def sae_fires(source, sae, layer, idx, cid):
    """(B, T) bool: latent cid is among the SAE's active TopK latents on the unsteered concept source's
    hidden state after block `layer` (value > 0, as the dictionary's freq counts it)."""
    def fires(w):
        x, _, _ = sae.standardise(source.forward_to(w, layer).float())
        values, indices = sae.topk(sae.encode_pre(x))
        return ((indices == cid) & (values > 0)).any(-1)
    return windowed(fires, idx, source.config.block_size)


def student_fires(model, idx, cid, steer=None):
    """(B, T) bool: concept cid is among the student's concept_topk predicted concepts, with the steer
    applied as in generation, so this is what the model mixed in."""
    return (concept_logits(model, idx, steer).topk(model.config.concept_topk, dim=-1).indices == cid).any(-1)


def measure_steering(gen_model, prompts, args, cid, steer=None, steer_ctx=nullcontext, source=None, sae=None,
                     layer=None, top_texts=None, student=None, enc=None, amp=nullcontext()):
    """Per condition ('unsteered', 'steered'): per generated sample the fraction of its new tokens on which
    concept cid fires (a) under the SAE on the concept source ('sae'), (b) by being one of the concept's
    top tokens in the dictionary ('tokens'), (c) in the student's own TopK ('student'). Prompt p uses
    seed args.seed + p in both conditions, so each steered sample has an unsteered twin.
    gen_model generates; steer goes to its concept head, steer_ctx() wraps the steered generation."""
    enc = enc or tokenizer()
    out = {c: {"sae": [], "tokens": [], "student": [], "seqs": [], "prompt": []} for c in ("unsteered", "steered")}
    for p, text in enumerate(prompts):
        ids = encode_prompt(enc, text, gen_model.config.vocab_size)
        for cond, st, ctx in (("unsteered", None, nullcontext), ("steered", steer, steer_ctx)):
            with ctx():
                seqs = generate(gen_model, ids, args, st, amp, seed=args.seed + p)
            idx = torch.tensor(seqs, dtype=torch.long, device=args.device)
            new = slice(len(ids), idx.size(1))
            r = out[cond]
            with amp:
                if sae is not None:
                    r["sae"].append(sae_fires(source, sae, layer, idx, cid)[:, new].float().mean(1).cpu())
                if student is not None:
                    r["student"].append(student_fires(student, idx, cid, st)[:, new].float().mean(1).cpu())
            if top_texts is not None:
                r["tokens"].append(torch.tensor([sum(token_text(enc, t) in top_texts for t in s[new]) / len(s[new])
                                                 for s in seqs]))
            r["seqs"] += seqs
            r["prompt"] += [p] * len(seqs)
    for r in out.values():
        for k in ("sae", "tokens", "student"):
            r[k] = torch.cat(r[k]).double() if r[k] else None
        r["n_tokens"] = len(r["seqs"]) * args.max_new_tokens
    return out


def paired_difference(a, b, groups):
    """Mean of b - a over pairs and its standard error over the per-prompt means (the samples of one
    prompt are not independent of each other), or over pairs when there is one prompt."""
    d, groups = b - a, torch.tensor(groups)
    units = torch.stack([d[groups == g].mean() for g in groups.unique()]) if groups.unique().numel() > 1 else d
    se = units.std().item() / units.numel() ** 0.5 if units.numel() > 1 else float("nan")
    return d.mean().item(), se


def format_measurement(res, title):
    cols = [("sae", "SAE on source"), ("tokens", "top tokens"), ("student", "student TopK")]
    line = lambda name, vals: f"{name:<20}" + "".join(f"{v:>18}" for v in vals)
    lines = [f"== {title} ==", line("condition", [c for _, c in cols] + ["tokens"])]
    for cond in ("unsteered", "steered"):
        r = res[cond]
        lines.append(line(cond, ["-" if r[k] is None else f"{r[k].mean().item():.4f}" for k, _ in cols] + [r["n_tokens"]]))
    diffs = []
    for k, _ in cols:
        a, b = res["unsteered"][k], res["steered"][k]
        diffs.append("-" if a is None else "{:+.4f} ± {:.4f}".format(*paired_difference(a, b, res["steered"]["prompt"])))
    lines.append(line("steered - unsteered", diffs + [""]))
    return "\n".join(lines)


def run_measurements(args, model, train_config, enc, amp):
    """sample.py's --measure_steer / --measure_steer_source: one table each."""
    source, sae, layer, sae_path = load_source_and_sae(args, train_config, model, "--measure_steer")
    student = model if has_concept_head(model) else None
    names = load_concepts(concepts_path(args, sae_path), sae.path)
    prompts = read_prompts(args.prompts, args.n_prompts)
    results = {}
    for flag, spec in (("--measure_steer", args.measure_steer), ("--measure_steer_source", args.measure_steer_source)):
        if not spec:
            continue
        if flag == "--measure_steer":
            check_steerable(model, flag)
        n = student.config.n_concepts if flag == "--measure_steer" else sae.n_latents
        steer = parse_steer([spec], n, flag)
        if len(steer) != 1:
            raise UsageError(f"{flag} takes one ID:FACTOR")
        (cid, factor), = steer.items()
        if cid >= sae.n_latents:
            raise UsageError(f"{flag}: concept {cid} is outside the SAE's {sae.n_latents} latents")
        entry = names.get(cid)
        top_texts = {t for t, *_ in entry.get("top_tokens", [])} if entry else None
        kw = dict(source=source, sae=sae, layer=layer, top_texts=top_texts, student=student, enc=enc, amp=amp)
        if flag == "--measure_steer":
            res = measure_steering(model, prompts, args, cid, steer=steer, **kw)
        else:  # the source writes; the student still reads its text, unsteered
            res = measure_steering(source, prompts, args, cid, steer_ctx=lambda: SourceSteering(source, sae, layer, steer), **kw)
        where = "student's concept logit" if flag == "--measure_steer" else "concept source's SAE latent"
        print(format_measurement(res, f"concept {cid} [{concept_name(entry) or 'no dictionary'}] x{factor:g} on the "
                                 f"{where}: {len(prompts)} prompts x {args.num_samples} samples x {args.max_new_tokens} tokens"))
        results[flag] = res
    print("# fraction of generated tokens on which the concept fires; ± is one standard error of the paired difference "
          "over prompts;\n# student TopK: the student's predicted concepts, steered as it generated (unsteered on the "
          "source's text)")
    return results
