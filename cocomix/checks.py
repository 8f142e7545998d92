"""
train.py's setting checks, kept out of it so that hardening never hides the method: each returns a
one-line message for the first problem found, or None. check_resume also compares the files behind
a resumed run's paths.
"""

import argparse
import math
import os
import sys

import torch

from cocomix.tracking import wandb_missing
from cocomix.weights import GPT2_NAMES, file_sha256, source_sha256

MODES = ("ntp", "cocomix", "kd", "pause")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_MIX = ("interleave", "add", "none")  # pause is a mode of its own, not a mixing rule
DATA_ORDERS = ("random", "epoch")


def check_config(c):
    """Settings that are wrong whatever the data and models: c is train.py's config dict."""
    if c["wandb_log"] and (problem := wandb_missing()):
        return problem
    if c["mode"] not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {c['mode']!r}"
    if c["mode"] == "cocomix" and c["mix"] not in STUDENT_MIX:
        return (
            f"mix must be one of {', '.join(STUDENT_MIX)} (for the pause baseline use "
            f"--mode=pause), got {c['mix']!r}"
        )
    if (
        min(c["batch_size"], c["block_size"], c["gradient_accumulation_steps"], c["max_iters"] + 1)
        <= 0
    ):
        return (
            "batch_size, block_size and gradient_accumulation_steps must be positive, "
            "max_iters non-negative"
        )
    if c["mode"] in ("cocomix", "kd") and not c["concept_source"]:
        return f"mode={c['mode']} needs --concept_source (a checkpoint of ours or a GPT-2 folder)"
    if c["mode"] == "cocomix" and not c["sae_path"]:
        return "mode=cocomix needs --sae_path (an SAE trained by sae.py, or OpenAI's)"
    if bad := [k for k, v in c.items() if isinstance(v, float) and not math.isfinite(v)]:
        return f"{', '.join(bad)} must be finite numbers"
    if min(c["n_layer"], c["n_head"], c["n_embd"]) <= 0 or c["n_embd"] % c["n_head"]:
        return (
            f"n_layer, n_head and n_embd must be positive, n_embd divisible by n_head; got "
            f"n_layer={c['n_layer']}, n_head={c['n_head']}, n_embd={c['n_embd']}"
        )
    if not 0 <= c["seed"] < 2**63:
        return f"seed must be in [0, 2**63), got {c['seed']}"
    if bad := [k for k in ("warmup_iters", "lr_decay_iters") if c[k] < -1]:
        return f"{' and '.join(bad)} must be >= 0 (or -1: the default), got " + ", ".join(
            f"{k}={c[k]}" for k in bad
        )
    if min(c["eval_interval"], c["log_interval"], c["eval_iters"]) <= 0:
        return "eval_interval, log_interval and eval_iters must be positive"
    if c["learning_rate"] < 0 or c["min_lr"] < 0 and c["min_lr"] != -1 or c["weight_decay"] < 0:
        return (
            "learning_rate and weight_decay must be >= 0, min_lr >= 0 (or -1: learning_rate / 10)"
        )
    if not (0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1):
        return f"beta1 and beta2 must be in [0, 1), got {c['beta1']} and {c['beta2']}"
    if c["grad_clip"] < 0:
        return f"grad_clip must be >= 0 (0: no clipping), got {c['grad_clip']}"
    if not 0 <= c["dropout"] < 1:
        return f"dropout must be in [0, 1), got {c['dropout']}"
    if min(c["k_attr"], c["concept_topk"]) <= 0 or min(c["lam"], c["lam_kd"], c["n_concepts"]) < 0:
        return "k_attr and concept_topk must be positive, lam, lam_kd and n_concepts >= 0"
    if c.get("data_order", "random") not in DATA_ORDERS:
        return f"data_order must be one of {', '.join(DATA_ORDERS)}, got {c['data_order']!r}"
    if c["dtype"] not in DTYPES:
        return f"dtype must be one of {', '.join(DTYPES)}, got {c['dtype']!r}"
    if (
        c["init_from"] not in ("scratch", "resume")
        and c["init_from"] not in GPT2_NAMES
        and not os.path.isdir(c["init_from"])
    ):
        return (
            f"init_from must be 'scratch', 'resume', a GPT-2 name ({', '.join(GPT2_NAMES)}) or a "
            f"GPT-2 folder, got {c['init_from']!r}"
        )
    return check_device(c["device"])


def available_memory():
    """Bytes this process may still allocate on the CPU: /proc/meminfo's MemAvailable, or the
    address-space limit (ulimit -v) when it is lower; None where neither is known."""
    import resource

    have = []
    try:
        with open("/proc/meminfo") as f:
            have += [int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")]
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    have += [soft] if soft != resource.RLIM_INFINITY else []
    return min(have) if have else None


CUDA_SLACK = 1.1  # the CUDA allocator's rounding and fragmentation over the traced peak


def check_memory(c, vocab_size, device="cpu", source=None, n_concepts=0, world_size=1):
    """A step that cannot fit in the device's memory, named by the settings that make it so, or
    None. On CUDA: cocomix/memory.py's estimate of the step (step_memory; source: the concept
    source's (n_layer, n_embd), n_concepts: C) with 10% slack for the allocator, against the free
    memory plus what this process holds already (the source and SAE, counted by the estimate); a
    run that does not fit is refused with the largest batch_size that fits, with
    gradient_accumulation_steps raised to keep the global batch. On a CPU a lower bound: the
    weights, gradients and AdamW's two moments in fp32 (16 bytes a parameter) and one micro-batch's
    logits in fp32."""
    gib = lambda n: f"{n / 2**30:,.1f} GiB"
    d, L, T, B = c["n_embd"], c["n_layer"], c["block_size"], c["batch_size"]
    if torch.device(device).type == "cuda":
        from cocomix.memory import largest_batch, step_memory

        free, _ = torch.cuda.mem_get_info(device)
        have = free + torch.cuda.memory_reserved(device)
        need = lambda s: CUDA_SLACK * step_memory(s, vocab_size, source, n_concepts)
        if need(c) <= have:
            return None
        smaller = largest_batch(c, lambda s: need(s) <= have, world_size)
        fix = (
            f"use --batch_size={smaller[0]} --gradient_accumulation_steps={smaller[1]} (the same "
            "global batch)"
            if smaller
            else "even batch_size=1 does not fit: lower n_embd, n_layer or block_size"
        )
        return (
            f"batch_size={B}, block_size={T}, n_embd={d}, n_layer={L}, mode={c['mode']}: the step "
            f"needs about {gib(need(c))} on {device} (cocomix/memory.py's estimate, "
            f"{CUDA_SLACK - 1:.0%} slack), {gib(have)} is free; {fix}"
        )
    if torch.device(device).type != "cpu":
        return None
    weights = 16 * (vocab_size * d + T * d + L * (12 * d * d + 13 * d) + 2 * d)
    logits = 4 * B * T * vocab_size
    have = available_memory()
    if have is None or weights + logits <= have:
        return None
    which = f"n_embd={d}, n_layer={L}" if weights >= logits else f"batch_size={B}, block_size={T}"
    return (
        f"{which}: the step needs at least {gib(weights + logits)} (weights, gradients and AdamW "
        f"state {gib(weights)}, one micro-batch's logits {gib(logits)}), and {gib(have)} is "
        "available: lower them"
    )


def check_device(device):
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', and there on this machine."""
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu"):
        return None
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            return f"device={device}, but CUDA is not available here (try --device=cpu)"
        if index and int(index) >= torch.cuda.device_count():
            return f"device={device}, but there are {torch.cuda.device_count()} CUDA devices"
        return None
    if device == "mps":
        return (
            None
            if torch.backends.mps.is_available()
            else "device=mps, but MPS is not available here"
        )
    return f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"


def check_source(source, vocab_size, block_size, concept_source):
    """The concept source (or KD teacher) against the data and the student's window."""
    if source.config.vocab_size != vocab_size:
        return (
            f"concept source {concept_source} has vocab {source.config.vocab_size}, "
            f"the data is GPT-2 BPE ({vocab_size})"
        )
    if source.config.block_size < block_size:
        return (
            f"block_size={block_size} is longer than the concept source's context "
            f"({source.config.block_size})"
        )
    return None


# a resume continues the run exactly only with the same model, objective and batches: other values
# are refused
# decay_all: other optimizer parameter groups
RESUME_SAME = (
    "mode",
    "label_rule",
    "label_fill",
    "concept_source",
    "sae_path",
    "sae_layer",
    "k_attr",
    "seed",
    "data_dir",
    "batch_size",
    "gradient_accumulation_steps",
    "data_order",
    "decay_all",
)
# the optimisation may change on purpose (a longer schedule, a lower rate): allowed, with a warning
RESUME_WARN = (
    "learning_rate",
    "min_lr",
    "warmup_iters",
    "lr_decay_iters",
    "decay_lr",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "lam",
    "lam_kd",
    "dtype",
)
RESUME_KEYS = ("model", "model_args", "optimizer", "scaler", "iter_num", "best_val_loss", "rng")


def input_hashes(data_dir, concept_source=None, sae_path=None):
    """SHA-256 of the files a run reads behind its settings' paths: the data's meta.json (prepare.py
    writes a new one with every corpus), the concept source and the SAE. Kept in the checkpoint for
    check_resume."""
    meta = os.path.join(data_dir, "meta.json")
    hashes = {"data_dir": file_sha256(meta) if os.path.exists(meta) else None}
    if concept_source:
        hashes["concept_source"] = source_sha256(concept_source)
    if sae_path:
        hashes["sae_path"] = file_sha256(sae_path)
    return hashes


def check_resume(checkpoint, model_args, config, ckpt_path, inputs):
    """A resumed run must be the run that wrote the checkpoint: same model, objective and batches,
    and the same files behind its paths (inputs: input_hashes). Changed optimisation settings are
    printed as warnings."""
    if missing := [k for k in RESUME_KEYS if k not in checkpoint]:
        return (
            f"{ckpt_path} cannot be resumed: it has no "
            f"{', '.join(missing)} (not a checkpoint train.py wrote)"
        )
    changed = {
        k: (checkpoint["model_args"].get(k), v)
        for k, v in model_args.items()
        if checkpoint["model_args"].get(k) != v
    }
    old = checkpoint.get("config") or {}
    norm = lambda k, v: os.path.normpath(v) if k == "data_dir" else v
    changed.update(
        {
            k: (old[k], config[k])
            for k in RESUME_SAME
            if k in old and k in config and norm(k, old[k]) != norm(k, config[k])
        }
    )
    if changed:
        return f"resume config disagrees with {ckpt_path}: " + ", ".join(
            f"{k}={b!r} (checkpoint: {a!r})" for k, (a, b) in changed.items()
        )
    old_inputs = checkpoint.get("inputs") or {}
    if swapped := [k for k, h in inputs.items() if k in old_inputs and old_inputs[k] != h]:
        return (
            f"{ckpt_path} was trained with other files at the same paths: "
            f"{', '.join(f'{k}={config[k]}' for k in swapped)} "
            "changed since (SHA-256); resume only with the files the run started with"
        )
    if checkpoint["iter_num"] > config["max_iters"]:
        return (
            f"max_iters={config['max_iters']} is below the step of {ckpt_path} "
            f"({checkpoint['iter_num']}): nothing to train; give max_iters >= "
            f"{checkpoint['iter_num']}"
        )
    if warn := [
        f"{k}={config[k]!r} (checkpoint: {old[k]!r})"
        for k in RESUME_WARN
        if k in old and k in config and old[k] != config[k]
    ]:
        print(
            f"warning: resuming {ckpt_path} with other settings: {', '.join(warn)}; the run is no "
            "longer the one an uninterrupted run would give",
            file=sys.stderr,
        )
    return None


class _Moved(argparse.Action):
    def __init__(self, *args, to, **kw):
        super().__init__(*args, **kw)
        self.to = to

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.to}")


def config_keys(script):
    """The config keys of a nanoGPT-style script (train.py): its top-level names assigned a number,
    bool or string before it builds config_keys, read from its source without running it."""
    import ast

    keys = []
    for node in ast.parse(open(script).read()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", "")
            if name == "config_keys":
                break
            value = node.value
            if isinstance(value, ast.UnaryOp):  # -1, -1.0
                value = value.operand
            if isinstance(value, ast.Constant) and not name.startswith("_"):
                keys.append(name)
    return keys


def config_help(script, values):
    """--help of a nanoGPT-style script: every config key as `name = default  # its comment`, under
    the comment lines above it (the file's group headers, `# I/O`, `# data`...), in the file's
    order. values: the script's globals when its configurator runs, i.e. the defaults."""
    import ast
    import io
    import tokenize

    src = open(script).read()
    lines = src.splitlines()
    comments = {}  # line number -> (comment, whether it stands on a line of its own)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string, not tok.line[: tok.start[1]].strip())
    keys = set(config_keys(script))
    out, last = [], 0  # last: the line where the previous statement ended
    width = max(len(f"{k} = {values[k]!r}") for k in keys) + 4
    for node in ast.parse(src).body:
        name = getattr(node.targets[0], "id", "") if isinstance(node, ast.Assign) else ""
        if name == "config_keys":  # the settings end here, as config_keys reads them
            break
        if name in keys:
            for i in range(last + 1, node.lineno):  # the comment lines above it, blank lines kept
                text, alone = comments.get(i, ("", False))
                if alone and not set(text) <= set("# -"):  # a rule of dashes says nothing
                    out.append(text)
                elif not lines[i - 1].strip() and out and out[-1]:
                    out.append("")
            key = f"  {name} = {values[name]!r}"
            side = [
                comments[i][0] for i in range(node.lineno, node.end_lineno + 1) if i in comments
            ]
            out.append(f"{key:<{width}}{' '.join(side)}".rstrip())
        last = node.end_lineno
    head = (
        f"usage: python {os.path.basename(script)} [CONFIG_FILE ...] [--key=value ...]\n\n"
        "Each config file (config/*.py) is run and may set any key below; --key=value sets one,\n"
        "its value a Python literal of the default's type. Later arguments win. The keys, their\n"
        "defaults and comments, grouped as the script groups them:\n\n"
    )
    return head + "\n".join(out).strip("\n")


def check_config_keys(flagged, script):
    """A one-line error (ValueError) for the first (flag, key) in flagged whose key the script does
    not have, with the nearest ones."""
    import difflib

    known = config_keys(script)
    for flag, key in flagged:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"{flag}: {os.path.basename(script)} has no config key {key!r}{hint}")


def moved_flag(parser, flag, to):
    """--flag, renamed or moved elsewhere: refused with where it went, not taken as a prefix of
    another."""
    parser.add_argument(
        f"--{flag}",
        nargs="?",
        help=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        action=_Moved,
        to=to,
    )
