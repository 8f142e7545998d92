"""
Sample from a trained model, steer it through its concepts, and look at the concepts it predicts.

    python sample.py --out_dir=out/cocomix --start="The capital of France" --max_new_tokens=100
    python sample.py --init_from=/path/to/gpt2 --start=FILE:prompt.txt --num_samples=3
    # steering: scale predicted concept logit z[..., 123] by 8 at every position;
    # --steer_source does the same to SAE latent 123 of the concept source; both print side by side
    python sample.py --out_dir=out/cocomix --steer=123:8 --steer_source=123:8 --temperature=0
    # which concepts the model predicts, per token, in the terminal and as an HTML page
    python sample.py --out_dir=out/cocomix --inspect --html=concepts.html

Generation uses the model's KV cache (GPT.generate, use_cache=True); --no_cache recomputes the whole
window every step. Steered runs are printed next to an unsteered run with the same seed. How often a
steered concept fires is measured by scripts/measure_steering.py; the inspection's table and page
are drawn by cocomix/inspection.py. Offline, TIKTOKEN_CACHE_DIR names the folder with tiktoken's
gpt2 files.
"""

import argparse
import os
import shutil
import sys
import textwrap
from contextlib import nullcontext

from cocomix.interrupt import on_ctrl_c

if __name__ == "__main__":  # Ctrl-C in the start-up (the imports below): one line, exit 130
    on_ctrl_c()

import torch

from cocomix.checks import check_device, moved_flag
from cocomix.corpus import tokenizer
from cocomix.dictionary import load_concepts
from cocomix.inspection import has_concept_head, inspect_runs
from cocomix.weights import sae_file
from model import GPT, load_checkpoint, load_frozen_gpt
from sae import SAE, check_sae_host

STEER_RANGE = 10.0  # |factor| <= 10, as the paper's steering experiments
EOT = "<|endoftext|>"


class UsageError(Exception):
    pass


def check_steerable(model, flag):
    """A UsageError unless steering the student's concept logits can change what it generates."""
    if not has_concept_head(model):
        raise UsageError(
            f"{flag} needs a model with a concept head (a CoCoMix checkpoint with n_concepts > 0)"
        )
    if model.config.mix == "none":
        raise UsageError(
            f"{flag}: this student (mix='none') predicts concepts but never mixes them back into "
            "its hidden states, so steering them changes nothing it generates"
        )


def parse_steer(specs, n_latents, what):
    """['3:2.5,7:-1', '9:4'] -> {3: 2.5, 7: -1.0, 9: 4.0}, checked against n_latents and ±10."""
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
                raise UsageError(
                    f"{what}: factor {f} for concept {i} is "
                    f"outside [-{STEER_RANGE:g}, {STEER_RANGE:g}]"
                )
            steer[i] = f
    return steer


def encode_prompt(enc, text, vocab_size):
    ids = enc.encode(text, allowed_special={EOT}) or [enc.eot_token]
    if max(ids) >= vocab_size:
        raise UsageError(
            f"the prompt has token {max(ids)}, outside the model's vocabulary of {vocab_size}"
        )
    return ids


def generate(model, ids, args, steer=None, ctx=nullcontext(), seed=None):
    """num_samples continuations of the prompt ids, one batch, reseeded so runs compare like for
    like: sampling draws its noise in a fixed pattern, so two runs with one seed share their random
    numbers."""
    torch.manual_seed(args.seed if seed is None else seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    with ctx:
        out = model.generate(
            idx,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            steer=steer or None,
            use_cache=not args.no_cache,
            shift=args.shift,
        )
    return out.tolist()


# -----------------------------------------------------------------------------
# the concept source and its SAE


def load_source_and_sae(args, train_config, model, what="--steer_source"):
    """(concept source, SAE, layer, sae_path) from the flags, else from the checkpoint's training
    config."""
    sae_path = args.sae_path or train_config.get("sae_path", "")
    if not sae_path:
        raise UsageError(f"{what} needs --sae_path (or a checkpoint trained with one)")
    sae = SAE.load(sae_path, map_location=args.device)
    layer = args.sae_layer if args.sae_layer >= 0 else sae.meta.get("layer")
    if layer is None or layer < 0:
        layer = train_config.get("sae_layer", -1)
    if layer is None or layer < 0:
        raise UsageError(f"{sae_path} does not record its layer: pass --sae_layer")
    src_path = (
        args.concept_source or train_config.get("concept_source", "") or sae.meta.get("host") or ""
    )
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
        raise UsageError(
            f"SAE layer {layer} is outside the concept source's {source.config.n_layer} blocks"
        )
    return source, sae, layer, sae_path


def concepts_path(args, sae_path):
    if args.concepts:
        return args.concepts
    # an OpenAI name: its downloaded file, which sae.py --describe wrote next to
    sae_path = sae_file(sae_path)
    for p in (
        (sae_path + ".concepts.json", os.path.splitext(sae_path)[0] + ".concepts.json")
        if sae_path
        else ()
    ):
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
            self.handle = self.block.register_forward_hook(
                lambda mod, inp, h: h + sae_steer_delta(self.sae, h, self.steer)
            )
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


# -----------------------------------------------------------------------------
# command line


def arg_parser():
    p = argparse.ArgumentParser(
        description="Sample from a GPT or CoCoMix checkpoint, with concept steering and inspection."
    )
    p.add_argument(
        "--out_dir", default="out", help="folder with ckpt.pt (train.py's), or a ckpt.pt path"
    )
    p.add_argument(
        "--init_from",
        default="",
        help="a local GPT-2 Hugging Face folder (or 'gpt2') instead of --out_dir",
    )
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="autocast dtype on cuda",
    )
    p.add_argument(
        "--no_cache",
        action="store_true",
        help="recompute the whole window every step (no KV cache)",
    )
    p.add_argument(
        "--shift",
        type=int,
        default=0,
        help="past block_size: 0 = recompute the window per step; "
        "s > 0 = rebuild the cache from the last block_size - s tokens",
    )
    p.add_argument(
        "--width", type=int, default=0, help="terminal width for side-by-side output (0 = detect)"
    )
    return add_concept_flags(p)


def add_concept_flags(p):
    """The flags of steering (the model's concepts, the source's SAE latents) and inspection."""
    p.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="ID:FACTOR[,ID:FACTOR]",
        help="multiply the predicted concept logit z[..., ID] by FACTOR in [-10, 10] (repeatable)",
    )
    p.add_argument(
        "--steer_source",
        action="append",
        default=[],
        metavar="ID:FACTOR[,ID:FACTOR]",
        help="scale SAE latent ID's pre-activation in the concept source by FACTOR (repeatable)",
    )
    p.add_argument(
        "--concept_source",
        default="",
        help="concept source for --steer_source: ckpt.pt, its folder or a GPT-2 folder (default: "
        "the checkpoint's training config, the SAE's host, or the model itself if plain)",
    )
    p.add_argument(
        "--sae_path", default="", help="SAE file (default: the checkpoint's training config)"
    )
    p.add_argument("--sae_layer", type=int, default=-1, help="-1 = the layer stored with the SAE")
    p.add_argument(
        "--inspect", action="store_true", help="print the top predicted concepts of every token"
    )
    p.add_argument("--inspect_top", type=int, default=3, help="concepts shown per token")
    p.add_argument(
        "--concepts",
        default="",
        help="concept dictionary JSON (default: the one sae.py "
        "--describe wrote next to the SAE, if there)",
    )
    p.add_argument(
        "--html",
        default="",
        help="write the inspection as a self-contained HTML page (implies --inspect)",
    )
    return p


def parse_args(argv=None):
    p = arg_parser()
    for flag in ("measure_steer", "measure_steer_source"):
        moved_flag(p, flag, "python -m scripts.measure_steering")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# loading


def load_model(args):
    """(model in eval mode, the training config stored with the checkpoint or {})."""
    if args.init_from:
        return GPT.from_pretrained(args.init_from).to(args.device).eval(), {}
    path = os.path.join(args.out_dir, "ckpt.pt") if os.path.isdir(args.out_dir) else args.out_dir
    if not os.path.exists(path):
        raise UsageError(
            f"no checkpoint at {path}: pass --out_dir=DIR with DIR/ckpt.pt, or "
            "--init_from=GPT2_FOLDER"
        )
    model, ckpt = load_checkpoint(path, args.device)
    return model.eval(), ckpt.get("config", {}) or {}


def read_prompt(start):
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8-sig") as f:  # a BOM is not text
            return f.read()
    return start


# -----------------------------------------------------------------------------
# output


def side_by_side(columns, width):
    """[(title, text)] printed in columns of equal width, as many per row as leave 30 characters
    each."""
    per_row = max(1, min(len(columns), width // 32))
    out = []
    for r in range(0, len(columns), per_row):
        group = columns[r : r + per_row]
        w = (width - 3 * (len(group) - 1)) // len(group)
        wrapped = []
        for title, text in group:
            lines = [title[:w], "-" * min(w, max(len(title), 8))]
            for para in text.split("\n"):
                lines += textwrap.wrap(
                    para, w, replace_whitespace=False, drop_whitespace=False
                ) or [""]
            wrapped.append(lines)
        for i in range(max(map(len, wrapped))):
            out.append(
                " | ".join((col[i] if i < len(col) else "").ljust(w) for col in wrapped).rstrip()
            )
        out.append("")
    return "\n".join(out)


# -----------------------------------------------------------------------------


def check_args(args):
    """The sampling settings, before any model is loaded."""
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise UsageError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    # a negative one would sample the least likely
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0 or args.shift < 0 or args.inspect_top < 1 or args.width < 0:
        raise UsageError("--top_k, --shift and --width must be >= 0, --inspect_top >= 1")
    if problem := check_device(args.device):
        raise UsageError(problem)


def amp_and_tokenizer(args):
    """The autocast context (--dtype, on CUDA only) and GPT-2's tokenizer; offline without
    TIKTOKEN_CACHE_DIR, corpus.py's one-line message as a UsageError."""
    amp = (
        torch.autocast("cuda", dtype=getattr(torch, args.dtype))
        if "cuda" in args.device and args.dtype != "float32"
        else nullcontext()
    )
    try:
        return amp, tokenizer()
    except RuntimeError as e:
        raise UsageError(str(e)) from None


def sample_runs(args, model, ids, amp, steer, source, sae, layer, src_steer):
    """The model's samples, then (with --steer) the steered model's, then (with --steer_source) the
    concept source's, unsteered and steered through its SAE."""
    # (title, model, steer or None, sequences); steered runs come next to unsteered ones with the
    # same seed
    runs = [("model", model, None, generate(model, ids, args, None, amp))]
    if steer:
        runs.append(
            (
                "model steered " + ",".join(f"{i}:{f:g}" for i, f in steer.items()),
                model,
                steer,
                generate(model, ids, args, steer, amp),
            )
        )
    if src_steer:
        if source is not model:
            runs.append(("concept source", source, None, generate(source, ids, args, None, amp)))
        with SourceSteering(source, sae, layer, src_steer):
            seqs = generate(source, ids, args, None, amp)
        runs.append(
            (
                "source steered " + ",".join(f"{i}:{f:g}" for i, f in src_steer.items()),
                source,
                None,
                seqs,
            )
        )
    return runs


def print_runs(runs, enc, args):
    """One sample alone, or several runs' samples side by side, per sample index."""
    width = args.width or shutil.get_terminal_size((160, 24)).columns
    for s in range(args.num_samples):
        cols = [
            (title + (f" #{s}" if args.num_samples > 1 else ""), enc.decode(seqs[s]))
            for title, _, _, seqs in runs
        ]
        if len(cols) == 1:
            print(cols[0][1])
            print("---------------")
        else:
            print(side_by_side(cols, width))


def run(args):
    check_args(args)
    torch.manual_seed(args.seed)
    model, train_config = load_model(args)
    cfg = model.config
    amp, enc = amp_and_tokenizer(args)
    ids = encode_prompt(enc, read_prompt(args.start), cfg.vocab_size)
    inspect = args.inspect or bool(args.html)

    steer = {}
    if args.steer:
        check_steerable(model, "--steer")
        steer = parse_steer(args.steer, cfg.n_concepts, "--steer")
    if inspect and not has_concept_head(model):
        raise UsageError(
            "--inspect/--html need a model with a concept "
            "head (a CoCoMix checkpoint with n_concepts > 0)"
        )

    source = sae = layer = None
    src_steer = {}
    if args.steer_source:
        source, sae, layer, sae_path = load_source_and_sae(args, train_config, model)
        src_steer = parse_steer(args.steer_source, sae.n_latents, "--steer_source")
    kind = "plain GPT" if not cfg.has_insert_layer else f"CoCoMix mix={cfg.mix}"
    print(
        f"# {kind}, {cfg.n_layer} layers, d={cfg.n_embd}; "
        f"{'KV cache' if not args.no_cache else 'no cache'}; prompt {len(ids)} tokens",
        file=sys.stderr,
    )
    if len(ids) > cfg.block_size:  # model.generate reads the window's last tokens only
        kept = cfg.block_size - (args.shift if not args.no_cache else 0)
        print(
            f"# the prompt's {len(ids)} tokens are more than block_size={cfg.block_size}: "
            f"the first {len(ids) - kept} are dropped, the model sees the last {kept}",
            file=sys.stderr,
        )

    runs = sample_runs(args, model, ids, amp, steer, source, sae, layer, src_steer)
    print_runs(runs, enc, args)

    if inspect:
        sae_path = args.sae_path or train_config.get("sae_path", "")
        names = load_concepts(concepts_path(args, sae_path), sae_file(sae_path))
        inspect_runs(model, runs, len(ids), enc, names, args.inspect_top, args.html)
    return runs


def main(argv=None):
    args = parse_args(argv)
    try:
        with torch.no_grad():
            return run(args)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
