"""
Sample from a trained model, steer it through its concepts, and look at the concepts it predicts.

    python sample.py --out_dir=out/cocomix --start="The capital of France" --max_new_tokens=100
    python sample.py --init_from=/path/to/gpt2 --start=FILE:prompt.txt --num_samples=3
    # steering (SPEC section 7): scale predicted concept logit z[..., 123] by 8 at every position;
    # --steer_source does the same to SAE latent 123 of the concept source; both print side by side
    python sample.py --out_dir=out/cocomix --steer=123:8 --steer_source=123:8 --temperature=0
    # which concepts the model predicts, per token, in the terminal and as an HTML page
    python sample.py --out_dir=out/cocomix --inspect --html=concepts.html
    # how often concept 123 fires in text generated with and without --steer=123:8 (paired seeds), read by
    # the SAE on the concept source, by the concept's top tokens and by the student's own TopK
    python sample.py --out_dir=out/cocomix --measure_steer=123:8 --measure_steer_source=123:8 --num_samples=8

Generation uses the model's KV cache (GPT.generate, use_cache=True); --no_cache recomputes the whole
window every step. Steered runs are printed next to an unsteered run with the same seed.
"""

import argparse
import html
import os
import shutil
import sys
import textwrap
from contextlib import nullcontext

import torch

from dictionary import concept_name, load_concepts
from model import GPT, load_checkpoint

STEER_RANGE = 10.0  # |factor| <= 10, as the paper's steering experiments
EOT = "<|endoftext|>"

_shared_tiktoken = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared", "tiktoken")
if os.path.isdir(_shared_tiktoken):  # offline copy of the GPT-2 BPE files
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _shared_tiktoken)


class UsageError(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a GPT or CoCoMix checkpoint, with concept steering and inspection.")
    p.add_argument("--out_dir", default="out", help="folder with ckpt.pt (train.py's), or a ckpt.pt path")
    p.add_argument("--init_from", default="", help="a local GPT-2 Hugging Face folder (or 'gpt2') instead of --out_dir")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="autocast dtype on cuda")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole window every step (no KV cache)")
    p.add_argument("--shift", type=int, default=0, help="past block_size: 0 = recompute the window per step; "
                   "s > 0 = rebuild the cache from the last block_size - s tokens")
    p.add_argument("--steer", action="append", default=[], metavar="ID:FACTOR[,ID:FACTOR]",
                   help="multiply the predicted concept logit z[..., ID] by FACTOR in [-10, 10] (repeatable)")
    p.add_argument("--steer_source", action="append", default=[], metavar="ID:FACTOR[,ID:FACTOR]",
                   help="scale SAE latent ID's pre-activation in the concept source by FACTOR (repeatable)")
    p.add_argument("--concept_source", default="", help="concept source for --steer_source: ckpt.pt, its folder or a "
                   "GPT-2 folder (default: the checkpoint's training config, the SAE's host, or the model itself if plain)")
    p.add_argument("--sae_path", default="", help="SAE file (default: the checkpoint's training config)")
    p.add_argument("--sae_layer", type=int, default=-1, help="-1 = the layer stored with the SAE")
    p.add_argument("--inspect", action="store_true", help="print the top predicted concepts of every token")
    p.add_argument("--inspect_top", type=int, default=3, help="concepts shown per token")
    p.add_argument("--concepts", default="", help="concept dictionary JSON (default <sae_path>.concepts.json if present)")
    p.add_argument("--html", default="", help="write the inspection as a self-contained HTML page (implies --inspect)")
    p.add_argument("--measure_steer", default="", metavar="ID:FACTOR", help="measure how often concept ID fires "
                   "in text generated with and without --steer=ID:FACTOR (paired seeds), over --prompts")
    p.add_argument("--measure_steer_source", default="", metavar="ID:FACTOR",
                   help="the same for --steer_source=ID:FACTOR (the concept source writes)")
    p.add_argument("--prompts", default="", help="text file whose first non-empty lines are the prompts (default: a few short ones)")
    p.add_argument("--n_prompts", type=int, default=8, help="prompts used from --prompts")
    p.add_argument("--width", type=int, default=0, help="terminal width for side-by-side output (0 = detect)")
    return p.parse_args(argv)


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


def has_concept_head(model):
    return getattr(model.config, "n_concepts", 0) > 0 and hasattr(model, "mixer")


# -----------------------------------------------------------------------------
# loading


def load_model(args):
    """(model in eval mode, the training config stored with the checkpoint or {})."""
    if args.init_from:
        return GPT.from_pretrained(args.init_from).to(args.device).eval(), {}
    path = os.path.join(args.out_dir, "ckpt.pt") if os.path.isdir(args.out_dir) else args.out_dir
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path}: pass --out_dir=DIR with DIR/ckpt.pt, or --init_from=GPT2_FOLDER")
    model, ckpt = load_checkpoint(path, args.device)
    return model.eval(), ckpt.get("config", {}) or {}


def load_sae(path, device="cpu"):
    from sae import SAE
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
        from model import load_frozen_gpt
        source = load_frozen_gpt(src_path, args.device)
    elif not model.config.cocomix:
        source = model  # a plain GPT is its own concept source
    else:
        raise UsageError(f"{what} needs --concept_source (the plain GPT the SAE reads)")
    if hasattr(sae, "check_host"):
        sae.check_host(source, layer)
    if not 0 <= layer < source.config.n_layer:
        raise UsageError(f"SAE layer {layer} is outside the concept source's {source.config.n_layer} blocks")
    return source, sae, layer, sae_path


def tokenizer():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def read_prompt(start):
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    return start


def encode_prompt(enc, text, vocab_size):
    ids = enc.encode(text, allowed_special={EOT}) or [enc.eot_token]
    if max(ids) >= vocab_size:
        raise UsageError(f"the prompt has token {max(ids)}, outside the model's vocabulary of {vocab_size}")
    return ids


def concepts_path(args, sae_path):
    if args.concepts:
        return args.concepts
    for p in (sae_path + ".concepts.json", os.path.splitext(sae_path)[0] + ".concepts.json") if sae_path else ():
        if os.path.exists(p):
            return p
    return ""


# -----------------------------------------------------------------------------
# steering the concept source through its SAE


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
# generation and inspection


def generate(model, ids, args, steer=None, ctx=nullcontext(), seed=None):
    """num_samples continuations of the prompt ids, one batch, reseeded so runs compare like for like:
    sampling draws its noise in a fixed pattern, so two runs with one seed share their random numbers."""
    torch.manual_seed(args.seed if seed is None else seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    with ctx:
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             steer=steer or None, use_cache=not args.no_cache, shift=args.shift)
    return out.tolist()


def windowed(fn, idx, bs):
    """fn (B, t <= bs) -> (B, t, ...) applied to idx (B, T) of any length: windows of bs tokens, each
    token past the first window seeing at least half a window of context."""
    outs, T, step = [fn(idx[:, :bs])], idx.size(1), max(1, bs // 2)
    for s in range(bs, T, step):
        e = min(s + step, T)
        outs.append(fn(idx[:, max(0, e - bs):e])[:, -(e - s):])
    return torch.cat(outs, dim=1)


@torch.no_grad()
def concept_logits(model, idx, steer=None):
    """Concept logits z (B, T, C) at insert_layer for every token of idx (B, T)."""
    z = lambda w: model(w, steer=steer or None, return_aux=True)[2]["z"]
    return windowed(z, idx, model.config.block_size).float()


def inspect_tokens(model, ids, n_prompt, steer=None, top=3, names=None):
    """Per token: {'pos', 'token' (id), 'prompt' (bool), 'concepts': [(id, logit, label), ...] best first}."""
    z = concept_logits(model, torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device), steer)[0]
    vals, inds = z.topk(min(top, z.size(-1)), dim=-1)
    names = names or {}
    rows = []
    for t, tok in enumerate(ids):
        cs = [(int(i), float(v), concept_name(names.get(int(i)))) for v, i in zip(vals[t].tolist(), inds[t].tolist())]
        rows.append({"pos": t, "token": tok, "prompt": t < n_prompt, "concepts": cs})
    return rows


def token_text(enc, tok):
    return enc.decode_single_token_bytes(tok).decode("utf-8", errors="replace")


def format_inspection(rows, enc, title):
    lines = [f"== concepts: {title} (top {len(rows[0]['concepts']) if rows else 0} predicted at insert_layer; "
             f"'>' marks generated tokens) =="]
    for r in rows:
        cs = ", ".join(f"{i}:{v:+.2f}" + (f" [{name}]" if name else "") for i, v, name in r["concepts"])
        lines.append(f"{r['pos']:5d} {' ' if r['prompt'] else '>'} {token_text(enc, r['token'])!r:18} {cs}")
    return "\n".join(lines)


def concept_colour(cid):
    return f"hsl({(cid * 137.508) % 360:.1f}, 70%, 82%)"  # golden-angle hues: neighbouring ids look different


HTML_HEAD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>CoCoMix concepts</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc; padding: 1em; }
/* scroll-margin: a #rNtM link lands 40% down the window, context above it, and near the top does not scroll */
.tok { position: relative; border-radius: 3px; padding: 1px 0; cursor: default; scroll-margin-top: 40vh; }
.nl { color: #999; }
.tok.prompt { text-decoration: underline dotted #888; }
.tok:hover { outline: 2px solid #333; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.8em; z-index: 10; background: #222; color: #eee;
  font-size: 12px; padding: 6px 8px; border-radius: 4px; white-space: pre; }
.tok:hover .tip, .tok:target .tip { display: block; }
.tok:target { outline: 2px solid #c00; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
</style></head><body>
"""


def visible(text):
    """A newline alone would leave its token no coloured area to see or hover: show it as a grey arrow too."""
    return html.escape(text).replace("\n", "<span class=\"nl\">\u21b5</span>\n")


def html_page(runs, enc):
    """runs: [(title, rows)] -> a self-contained page (inline CSS only, no scripts or external files). Token
    pos of run r has id r{r}t{pos}: page.html#r0t5 opens with its concepts shown, as on hover (for links and
    headless screenshots, which cannot hover)."""
    out = [HTML_HEAD, "<h1>Predicted concepts per token</h1>",
           "<p>Each token is coloured by its top predicted concept (logits of the concept head at insert_layer); "
           "hover for the top concepts. Dotted underline: prompt.</p>"]
    for n, (title, rows) in enumerate(runs):
        out.append(f"<h2>{html.escape(title)}</h2><div class=\"text\">")
        counts = {}
        for r in rows:
            cid, v, name = r["concepts"][0]
            counts[cid] = (counts.get(cid, (0, name))[0] + 1, name)
            tip = "\n".join(f"{i}: {val:+.3f}  {nm}" for i, val, nm in r["concepts"])
            tip = f"pos {r['pos']} token {r['token']} {token_text(enc, r['token'])!r}{' (prompt)' if r['prompt'] else ''}\n{tip}"
            out.append(f"<span id=\"r{n}t{r['pos']}\" class=\"tok{' prompt' if r['prompt'] else ''}\" style=\"background:{concept_colour(cid)}\" "
                       f"title=\"{html.escape(tip)}\">{visible(token_text(enc, r['token']))}"
                       f"<span class=\"tip\">{html.escape(tip)}</span></span>")
        out.append("</div><table><tr><th>concept</th><th>name</th><th>tokens it tops</th></tr>")
        for cid, (n, name) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
            out.append(f"<tr><td style=\"background:{concept_colour(cid)}\">{cid}</td><td>{html.escape(name)}</td><td>{n}</td></tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "".join(out)


def side_by_side(columns, width):
    """[(title, text)] printed in columns of equal width, as many per row as leave 30 characters each."""
    per_row = max(1, min(len(columns), width // 32))
    out = []
    for r in range(0, len(columns), per_row):
        group = columns[r:r + per_row]
        w = (width - 3 * (len(group) - 1)) // len(group)
        wrapped = []
        for title, text in group:
            lines = [title[:w], "-" * min(w, max(len(title), 8))]
            for para in text.split("\n"):
                lines += textwrap.wrap(para, w, replace_whitespace=False, drop_whitespace=False) or [""]
            wrapped.append(lines)
        for i in range(max(map(len, wrapped))):
            out.append(" | ".join((col[i] if i < len(col) else "").ljust(w) for col in wrapped).rstrip())
        out.append("")
    return "\n".join(out)


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
    """--measure_steer / --measure_steer_source: one table each."""
    source, sae, layer, sae_path = load_source_and_sae(args, train_config, model, "--measure_steer")
    student = model if has_concept_head(model) else None
    names = load_concepts(concepts_path(args, sae_path))
    prompts = read_prompts(args.prompts, args.n_prompts)
    results = {}
    for flag, spec in (("--measure_steer", args.measure_steer), ("--measure_steer_source", args.measure_steer_source)):
        if not spec:
            continue
        if flag == "--measure_steer" and student is None:
            raise UsageError("--measure_steer needs a model with a concept head (a CoCoMix checkpoint with n_concepts > 0)")
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


# -----------------------------------------------------------------------------


def run(args):
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise UsageError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    torch.manual_seed(args.seed)
    model, train_config = load_model(args)
    cfg = model.config
    amp = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if "cuda" in args.device and args.dtype != "float32" else nullcontext()
    enc = tokenizer()
    ids = encode_prompt(enc, read_prompt(args.start), cfg.vocab_size)
    inspect = args.inspect or bool(args.html)
    if args.measure_steer or args.measure_steer_source:
        return run_measurements(args, model, train_config, enc, amp)

    steer = {}
    if args.steer:
        if not has_concept_head(model):
            raise UsageError("--steer needs a model with a concept head (a CoCoMix checkpoint with n_concepts > 0)")
        steer = parse_steer(args.steer, cfg.n_concepts, "--steer")
    if inspect and not has_concept_head(model):
        raise UsageError("--inspect/--html need a model with a concept head (a CoCoMix checkpoint with n_concepts > 0)")

    source = sae = layer = None
    src_steer = {}
    if args.steer_source:
        source, sae, layer, sae_path = load_source_and_sae(args, train_config, model)
        src_steer = parse_steer(args.steer_source, sae.n_latents, "--steer_source")
    kind = "plain GPT" if not cfg.cocomix else f"CoCoMix mix={cfg.mix}"
    print(f"# {kind}, {cfg.n_layer} layers, d={cfg.n_embd}; {'KV cache' if not args.no_cache else 'no cache'}; "
          f"prompt {len(ids)} tokens", file=sys.stderr)

    # (title, model, steer or None, sequences); steered runs come next to unsteered ones with the same seed
    runs = [("model", model, None, generate(model, ids, args, None, amp))]
    if steer:
        runs.append(("model steered " + ",".join(f"{i}:{f:g}" for i, f in steer.items()), model, steer,
                     generate(model, ids, args, steer, amp)))
    if src_steer:
        if source is not model:
            runs.append(("concept source", source, None, generate(source, ids, args, None, amp)))
        with SourceSteering(source, sae, layer, src_steer):
            seqs = generate(source, ids, args, None, amp)
        runs.append(("source steered " + ",".join(f"{i}:{f:g}" for i, f in src_steer.items()), source, None, seqs))

    width = args.width or shutil.get_terminal_size((160, 24)).columns
    for s in range(args.num_samples):
        cols = [(title + (f" #{s}" if args.num_samples > 1 else ""), enc.decode(seqs[s])) for title, _, _, seqs in runs]
        if len(cols) == 1:
            print(cols[0][1])
            print("---------------")
        else:
            print(side_by_side(cols, width))

    if inspect:
        names = load_concepts(concepts_path(args, args.sae_path or train_config.get("sae_path", "")))
        if names and len(names) != cfg.n_concepts:
            print(f"# warning: the concept dictionary has {len(names)} entries, the model {cfg.n_concepts} concepts",
                  file=sys.stderr)
        pages = []
        for title, m, st, seqs in runs:
            if m is not model:
                continue
            for s in range(args.num_samples):
                t = title + (f" #{s}" if args.num_samples > 1 else "")
                rows = inspect_tokens(model, seqs[s], len(ids), st, args.inspect_top, names)
                print(format_inspection(rows, enc, t))
                pages.append((t, rows))
        if args.html:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(html_page(pages, enc))
            print(f"# wrote {args.html}", file=sys.stderr)
    return runs


def main(argv=None):
    args = parse_args(argv)
    try:
        with torch.no_grad():
            return run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
