"""
Reading train.py's checkpoints with the checks that make a bad file a one-line error rather than a
crash deep inside. model.load_checkpoint builds the model from what these return. Nothing here runs
pickled code.
"""

import os

from cocomix.weights import first_line, load_torch_file

# parameters renamed since older checkpoints were written: old name -> new name
RENAMED = {"mixer.W_cmp": "mixer.W_cmp_T"}


def read_checkpoint(path, known_args, device="cpu"):
    """The checkpoint dict of train.py's file at path, checked to hold a model this code can build:
    model_args whose keys are all in known_args (GPTConfig's fields)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ckpt = load_torch_file(path, "checkpoint", device)  # one-line ValueErrors; no pickle code runs
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("model"), dict)
        and isinstance(ckpt.get("model_args"), dict)
    ):
        raise ValueError(f"{path}: not a cocomix checkpoint (no 'model' and 'model_args' entries)")
    # written before the pause baseline had its own key
    if ckpt["model_args"].get("mix") == "pause":
        ckpt["model_args"] = dict(ckpt["model_args"], mix="interleave", pause=True)
    if unknown := sorted(set(ckpt["model_args"]) - set(known_args)):
        raise ValueError(
            f"{path}: its model_args has settings this GPTConfig does not know "
            f"({', '.join(unknown)}): written by another version of model.py?"
        )
    return ckpt


def load_weights(model, state_dict, path):
    """model.load_state_dict with the names of older files mapped to today's; a misfit is a
    ValueError naming the file."""
    sd = {}
    for k, v in state_dict.items():
        # torch.compile's and DDP's prefixes
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        sd[RENAMED.get(k, k)] = v
    if model.config.mix == "none":  # older mix='none' checkpoints carry an unused compression layer
        sd = {k: v for k, v in sd.items() if k not in ("mixer.W_cmp_T", "mixer.b_cmp")}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise ValueError(
            f"{path}: its weights do not fit its model_args ({first_line(e)})"
        ) from None
