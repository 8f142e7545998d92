"""
sae.py's command line: its flags and their checks, a training run's settings with the defaults
resolved, and its resume file (refused unless written with the same settings). The training itself
is in sae_train.py, the SAE in sae.py.
"""

import argparse
import math
import os

import torch

from cocomix.checks import check_device, moved_flag
from cocomix.weights import source_sha256

# flags a resume need not match: where files go, how often, where it runs, what is done afterwards;
# the host and the data are matched by resume_key instead, by content and by absolute path
RESUME_FREE = (
    "concept_source",
    "data_dir",
    "sae_path",
    "eval_only",
    "describe",
    "eval_tokens",
    "device",
    "log_interval",
    "ckpt_interval",
)


def arg_parser():
    p = argparse.ArgumentParser(
        description="Train, evaluate or describe a TopK SAE on a GPT's residual stream."
    )
    p.add_argument(
        "--concept_source",
        help="the host GPT: ckpt.pt (or its folder), a GPT-2 Hugging Face folder, or 'gpt2'",
    )
    p.add_argument(
        "--data_dir", required=True, help="folder with train.bin and val.bin (prepare.py)"
    )
    p.add_argument("--layer", type=int, help="block whose output is encoded (0-based)")
    p.add_argument(
        "--sae_path",
        default="out/sae/sae.pt",
        help="where the trained SAE is written, or the "
        "SAE that --eval_only / --describe read ('openai:resid_post_mlp_v5_32k/5' downloads)",
    )
    for old, new in (("ckpt", "--concept_source"), ("out", "--sae_path"), ("sae", "--sae_path")):
        moved_flag(p, old, new)
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--describe", action="store_true", help="only write <sae>.concepts.json")
    p.add_argument("--n_latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training activations")
    p.add_argument("--batch_size", type=int, default=4096, help="activations per step")
    p.add_argument(
        "--lr", type=float, default=None, help="default 2e-4 / sqrt(n_latents / 2^14) (Gao et al.)"
    )
    p.add_argument("--buffer", type=int, default=1 << 18, help="shuffling buffer, activations")
    p.add_argument("--dead_tokens", type=int, default=None, help="default min(10M, tokens / 10)")
    p.add_argument("--k_aux", type=int, default=None, help="default d / 2")
    p.add_argument("--aux_coef", type=float, default=1 / 32)
    p.add_argument("--block_size", type=int, default=None, help="window length; default the host's")
    p.add_argument("--host_batch", type=int, default=8, help="windows per host forward pass")
    p.add_argument("--eval_tokens", type=int, default=65536)
    p.add_argument(
        "--log_interval", type=int, default=10, help="steps between lines of <sae>.metrics.jsonl"
    )
    p.add_argument(
        "--ckpt_interval",
        type=int,
        default=500,
        help="steps between saves of <sae>.resume.pt (0: only at the end and on SIGINT/SIGTERM); "
        "a run with that file and the same settings resumes",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    return p


def check_args(a):
    """Settings wrong whatever the host and data: a one-line message for the first, or None."""
    if a.n_latents <= 0 or not 0 < a.k <= a.n_latents:
        return (
            "--n_latents must be positive and --k in [1, n_latents], got "
            f"n_latents={a.n_latents}, k={a.k}"
        )
    if (
        min(a.tokens, a.batch_size, a.buffer, a.host_batch, a.eval_tokens, a.log_interval) <= 0
        or a.ckpt_interval < 0
    ):
        return (
            "--tokens, --batch_size, --buffer, --host_batch, --eval_tokens and --log_interval "
            "must be positive, --ckpt_interval >= 0"
        )
    if a.tokens < a.batch_size:
        return f"--tokens={a.tokens} is less than one batch (--batch_size={a.batch_size})"
    if any(v is not None and v <= 0 for v in (a.dead_tokens, a.k_aux, a.block_size)):
        return "--dead_tokens, --k_aux and --block_size must be positive"
    if (
        a.lr is not None
        and not (a.lr > 0 and math.isfinite(a.lr))
        or not (a.aux_coef >= 0 and math.isfinite(a.aux_coef))
    ):
        return (
            f"--lr must be a positive number and --aux_coef >= 0, got lr={a.lr}, "
            f"aux_coef={a.aux_coef}"
        )
    return check_device(a.device)


def usable(m):
    """A one-line reason why a trained SAE's held-out metrics make it useless, or None: it
    reconstructs worse than the mean activation would (FVU > 1), or no latent fires."""
    if not m["fvu"] <= 1 or m["l0"] == 0 or m["dead"] >= 1.0:
        return (
            f"FVU {m['fvu']:.4g}, L0 {m['l0']:.3g}, {m['dead']:.0%} "
            "of the latents never fire on held-out text"
        )
    return None


def out_file(a, suffix):
    """A training run's files next to --sae_path: <sae>.metrics.jsonl, .resume.pt, .concepts.json"""
    return os.path.splitext(a.sae_path)[0] + suffix


def run_settings(a, cfg):
    """The training settings with their defaults resolved (logged, and kept in the SAE's meta), and
    the SAE's meta."""
    settings = dict(
        vars(a),
        lr=a.lr or 2e-4 / math.sqrt(a.n_latents / 2**14),  # Gao et al.'s scaling with C
        dead_tokens=a.dead_tokens or min(10_000_000, a.tokens // 10),
        block_size=a.block_size or cfg.block_size,
        steps=max(1, a.tokens // a.batch_size),
    )
    src = a.concept_source
    is_ours = os.path.isdir(src) and not os.path.exists(os.path.join(src, "config.json"))
    host = os.path.join(src, "ckpt.pt") if is_ours else src
    meta = {
        "host": os.path.abspath(host) if os.path.exists(host) else host,
        "host_sha256": source_sha256(src),  # a file's, or a GPT-2 folder's config and weights
        "layer": a.layer,
        "d": cfg.n_embd,
        "tokenizer": "gpt2",
        "data_dir": os.path.abspath(a.data_dir),
        "train": settings,
    }
    return settings, meta


def resume_key(settings, meta):
    """What a resume must match: everything the trained SAE depends on, the host by its content when
    it is a file."""
    same = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    same.update(host=meta["host_sha256"] or meta["host"], data_dir=meta["data_dir"])
    return same


def read_resume(path, same):
    """The resume file at `path` (None when there is none), refused unless it was written with the
    settings `same`."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        old = saved["settings"]
    except Exception as e:
        raise SystemExit(
            f"error: {path} is not a readable resume file "
            f"({type(e).__name__}); delete it to start over"
        )
    diff = [
        f"{k}={same.get(k)!r} (resume file: {old.get(k)!r})"
        for k in sorted(set(old) | set(same))
        if old.get(k) != same.get(k)
    ]
    if diff:
        raise SystemExit(
            f"error: {path} was written with other settings: "
            f"{', '.join(diff)}; use those or delete it"
        )
    return saved
