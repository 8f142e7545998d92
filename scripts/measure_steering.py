"""
How often a steered concept fires: text is generated with and without the steer, with the same seed
per prompt in both conditions (paired), and one concept's firing is read three ways: by the SAE on
the concept source, by the concept's top tokens in the dictionary, and by the student's own TopK.

    # concept 123's logit x8 in the student, and SAE latent 123 x8 in the concept source
    python -m scripts.measure_steering --out_dir=out/cocomix --measure_steer=123:8 \
        --measure_steer_source=123:8 --num_samples=8
"""

import sys
from contextlib import nullcontext

import torch

from cocomix.corpus import tokenizer
from cocomix.dictionary import concept_name, load_concepts
from cocomix.inspection import concept_logits, has_concept_head, token_text, windowed
from sample import (
    SourceSteering,
    UsageError,
    amp_and_tokenizer,
    arg_parser,
    check_args,
    check_steerable,
    concepts_path,
    encode_prompt,
    generate,
    load_model,
    load_source_and_sae,
    parse_steer,
)

# -----------------------------------------------------------------------------
# measuring steering: how often one concept fires in the generated text, steered vs not

DEFAULT_PROMPTS = [
    "The",
    "In the morning",
    "Once upon a time",
    "It was",
    "I think that",
    "The first thing",
    "She said",
    "After a while",
]  # short and neutral, so the concept is not already in the prompt


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
    """(B, T) bool: latent cid is among the SAE's active TopK latents on the unsteered concept
    source's hidden state after block `layer` (value > 0, as the dictionary's freq counts it)."""

    def fires(w):
        x, _, _ = sae.standardise(source.forward_to(w, layer).float())
        values, indices = sae.topk(sae.encode_pre(x))
        return ((indices == cid) & (values > 0)).any(-1)

    return windowed(fires, idx, source.config.block_size)


def student_fires(model, idx, cid, steer=None):
    """(B, T) bool: concept cid is among the student's concept_topk predicted concepts, with the
    steer applied as in generation, so this is what the model mixed in."""
    return (
        concept_logits(model, idx, steer).topk(model.config.concept_topk, dim=-1).indices == cid
    ).any(-1)


def measure_steering(
    gen_model,
    prompts,
    args,
    cid,
    steer=None,
    steer_ctx=nullcontext,
    source=None,
    sae=None,
    layer=None,
    top_texts=None,
    student=None,
    enc=None,
    amp=nullcontext(),
):
    """Per condition ('unsteered', 'steered'): per generated sample the fraction of its new tokens
    on which concept cid fires (a) under the SAE on the concept source ('sae'), (b) by being one of
    the concept's top tokens in the dictionary ('tokens'), (c) in the student's own TopK
    ('student'). Prompt p uses seed args.seed + p in both conditions, so each steered sample has an
    unsteered twin. gen_model generates; steer goes to its concept head, steer_ctx() wraps the
    steered generation."""
    enc = enc or tokenizer()
    out = {
        c: {"sae": [], "tokens": [], "student": [], "seqs": [], "prompt": []}
        for c in ("unsteered", "steered")
    }
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
                    r["sae"].append(
                        sae_fires(source, sae, layer, idx, cid)[:, new].float().mean(1).cpu()
                    )
                if student is not None:
                    r["student"].append(
                        student_fires(student, idx, cid, st)[:, new].float().mean(1).cpu()
                    )
            if top_texts is not None:
                r["tokens"].append(
                    torch.tensor(
                        [
                            sum(token_text(enc, t) in top_texts for t in s[new]) / len(s[new])
                            for s in seqs
                        ]
                    )
                )
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
    units = (
        torch.stack([d[groups == g].mean() for g in groups.unique()])
        if groups.unique().numel() > 1
        else d
    )
    se = units.std().item() / units.numel() ** 0.5 if units.numel() > 1 else float("nan")
    return d.mean().item(), se


def format_measurement(res, title):
    cols = [("sae", "SAE on source"), ("tokens", "top tokens"), ("student", "student TopK")]
    line = lambda name, vals: f"{name:<20}" + "".join(f"{v:>18}" for v in vals)
    lines = [f"== {title} ==", line("condition", [c for _, c in cols] + ["tokens"])]
    for cond in ("unsteered", "steered"):
        r = res[cond]
        lines.append(
            line(
                cond,
                ["-" if r[k] is None else f"{r[k].mean().item():.4f}" for k, _ in cols]
                + [r["n_tokens"]],
            )
        )
    diffs = []
    for k, _ in cols:
        a, b = res["unsteered"][k], res["steered"][k]
        diffs.append(
            "-"
            if a is None
            else "{:+.4f} ± {:.4f}".format(*paired_difference(a, b, res["steered"]["prompt"]))
        )
    lines.append(line("steered - unsteered", diffs + [""]))
    return "\n".join(lines)


def run_measurements(args, model, train_config, enc, amp):
    """sample.py's --measure_steer / --measure_steer_source: one table each."""
    source, sae, layer, sae_path = load_source_and_sae(args, train_config, model, "--measure_steer")
    student = model if has_concept_head(model) else None
    names = load_concepts(concepts_path(args, sae_path), sae.path)
    prompts = read_prompts(args.prompts, args.n_prompts)
    results = {}
    for flag, spec in (
        ("--measure_steer", args.measure_steer),
        ("--measure_steer_source", args.measure_steer_source),
    ):
        if not spec:
            continue
        if flag == "--measure_steer":
            check_steerable(model, flag)
        n = student.config.n_concepts if flag == "--measure_steer" else sae.n_latents
        steer = parse_steer([spec], n, flag)
        if len(steer) != 1:
            raise UsageError(f"{flag} takes one ID:FACTOR")
        ((cid, factor),) = steer.items()
        if cid >= sae.n_latents:
            raise UsageError(f"{flag}: concept {cid} is outside the SAE's {sae.n_latents} latents")
        entry = names.get(cid)
        top_texts = {t for t, *_ in entry.get("top_tokens", [])} if entry else None
        kw = dict(
            source=source,
            sae=sae,
            layer=layer,
            top_texts=top_texts,
            student=student,
            enc=enc,
            amp=amp,
        )
        if flag == "--measure_steer":
            res = measure_steering(model, prompts, args, cid, steer=steer, **kw)
        else:  # the source writes; the student still reads its text, unsteered
            res = measure_steering(
                source,
                prompts,
                args,
                cid,
                steer_ctx=lambda: SourceSteering(source, sae, layer, steer),
                **kw,
            )
        where = (
            "student's concept logit"
            if flag == "--measure_steer"
            else "concept source's SAE latent"
        )
        print(
            format_measurement(
                res,
                f"concept {cid} [{concept_name(entry) or 'no dictionary'}] x{factor:g} on the "
                f"{where}: {len(prompts)} prompts x {args.num_samples} samples x "
                f"{args.max_new_tokens} tokens",
            )
        )
        results[flag] = res
    print(
        "# fraction of generated tokens on which the concept fires; ± is one standard error of "
        "the paired difference over prompts;\n# student TopK: the student's predicted concepts, "
        "steered as it generated (unsteered on the source's text)"
    )
    return results


def main(argv=None):
    p = arg_parser()
    p.description = "Measure how often a concept fires in text generated with and without a steer."
    p.add_argument(
        "--measure_steer",
        default="",
        metavar="ID:FACTOR",
        help="measure how often concept "
        "ID fires in text generated with and without --steer=ID:FACTOR (paired seeds)",
    )
    p.add_argument(
        "--measure_steer_source",
        default="",
        metavar="ID:FACTOR",
        help="the same for --steer_source=ID:FACTOR (the concept source writes)",
    )
    p.add_argument(
        "--prompts",
        default="",
        help="text file whose first non-empty lines are the prompts (default: a few short ones)",
    )
    p.add_argument("--n_prompts", type=int, default=8, help="prompts used from --prompts")
    args = p.parse_args(argv)
    try:
        if not (args.measure_steer or args.measure_steer_source):
            raise UsageError(
                "give --measure_steer=ID:FACTOR and/or --measure_steer_source=ID:FACTOR"
            )
        if ignored := [
            f
            for f, v in (
                ("--steer", args.steer),
                ("--steer_source", args.steer_source),
                ("--inspect", args.inspect),
                ("--html", args.html),
            )
            if v
        ]:
            raise UsageError(
                f"{', '.join(ignored)} cannot go with "
                "--measure_steer/--measure_steer_source, which only measure"
            )
        if args.n_prompts < 1:
            raise UsageError("--n_prompts must be >= 1")
        check_args(args)
        torch.manual_seed(args.seed)
        model, train_config = load_model(args)
        amp, enc = amp_and_tokenizer(args)
        with torch.no_grad():
            return run_measurements(args, model, train_config, enc, amp)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
