"""
train.py's checks of its settings, kept out of the training loop so that hardening never hides the
method: each returns a one-line message for the first problem found, or None.
"""

MODES = ("ntp", "cocomix", "kd", "pause")
STUDENT_MIX = ("interleave", "add", "none")  # pause is a mode of its own, not a mixing rule


def check_config(c):
    """Settings that are wrong whatever the data and models: c is train.py's config dict."""
    if c["mode"] not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {c['mode']!r}"
    if c["mode"] == "cocomix" and c["mix"] not in STUDENT_MIX:
        return f"mix must be one of {', '.join(STUDENT_MIX)} (for the pause baseline use --mode=pause), got {c['mix']!r}"
    if min(c["batch_size"], c["block_size"], c["gradient_accumulation_steps"], c["max_iters"] + 1) <= 0:
        return "batch_size, block_size and gradient_accumulation_steps must be positive, max_iters non-negative"
    if c["mode"] in ("cocomix", "kd") and not c["concept_source"]:
        return f"mode={c['mode']} needs --concept_source (a checkpoint of ours or a GPT-2 folder)"
    if c["mode"] == "cocomix" and not c["sae_path"]:
        return "mode=cocomix needs --sae_path (an SAE trained by sae.py, or OpenAI's)"
    return None


def check_source(source, vocab_size, block_size, concept_source):
    """The concept source (or KD teacher) against the data and the student's window."""
    if source.config.vocab_size != vocab_size:
        return f"concept source {concept_source} has vocab {source.config.vocab_size}, the data is GPT-2 BPE ({vocab_size})"
    if source.config.block_size < block_size:
        return f"block_size={block_size} is longer than the concept source's context ({source.config.block_size})"
    return None


def check_resume(checkpoint, model_args, config, ckpt_path):
    """A resumed run must be the run that wrote the checkpoint: same model and objective."""
    changed = {k: (checkpoint['model_args'].get(k), v) for k, v in model_args.items() if checkpoint['model_args'].get(k) != v}
    old = checkpoint.get('config', {})
    changed.update({k: (old[k], config[k]) for k in ('mode', 'label_rule', 'concept_source', 'sae_path', 'seed')
                    if k in old and old[k] != config[k]})
    if changed:
        return f"resume config disagrees with {ckpt_path}: " + ", ".join(f"{k}={b!r} (checkpoint: {a!r})" for k, (a, b) in changed.items())
    return None
