"""
Loading trained models, with the checks that make a bad file a one-line error rather than a crash
deep inside: train.py's checkpoints (load_checkpoint), and the frozen plain GPTs that serve as
concept source, SAE host or KD teacher (load_frozen_gpt). Nothing here runs pickled code.
"""

import os

from model import GPT, GPTConfig
from weights import GPT2_NAMES, first_line, load_torch_file


def load_checkpoint(path, device="cpu"):
    """A model saved by train.py (or sae.py's host): returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ckpt = load_torch_file(path, "checkpoint", device)  # one-line ValueErrors; no pickle code ever runs
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_args"), dict):
        raise ValueError(f"{path}: not a cocomix checkpoint (no 'model' and 'model_args' entries)")
    if unknown := sorted(set(ckpt["model_args"]) - set(GPTConfig.__dataclass_fields__)):
        raise ValueError(f"{path}: its model_args has settings this GPTConfig does not know ({', '.join(unknown)}): "
                         "written by another version of model.py?")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    if model.config.mix == "none":  # older mix='none' checkpoints carry an unused compression layer
        sd = {k: v for k, v in sd.items() if k not in ("mixer.W_cmp", "mixer.b_cmp")}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise ValueError(f"{path}: its weights do not fit its model_args ({first_line(e)})") from None
    return model.to(device), ckpt


def load_frozen_gpt(path, device="cpu"):
    """A frozen plain GPT (concept source, SAE host): our ckpt.pt or its folder, a Hugging Face GPT-2
    folder, or a GPT-2 name to download. No parameter of it ever needs a gradient."""
    if path in GPT2_NAMES or os.path.exists(os.path.join(path, "config.json")):
        model = GPT.from_pretrained(path)
    else:
        model, _ = load_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)
    if model.config.has_insert_layer:
        raise ValueError(f"{path}: a concept source or SAE host must be a plain GPT, not a CoCoMix student")
    return model.to(device).eval().requires_grad_(False)
