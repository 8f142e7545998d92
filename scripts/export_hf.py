"""
Export a plain GPT checkpoint (an NTP or KD student, or a concept source) as a Hugging Face GPT-2
folder: config.json, model.safetensors and GPT-2's tokenizer files, so lm-evaluation-harness or
`transformers` take it as it is:

    python -m scripts.export_hf --ckpt=out/ntp/ckpt.pt                    # -> out/ntp/hf
    lm_eval --model hf --model_args pretrained=out/ntp/hf --tasks lambada_openai,piqa
    # reads it back, no transformers needed
    python -m scripts.eval --init_from=out/ntp/hf --suite=benchmarks/

CoCoMix students (and the pause baseline) are refused: their concept head and the concept slots
interleaved with the tokens have no place in GPT-2's architecture, so any GPT-2 loader would compute
another function. Evaluate them with scripts/eval.py.

The weights keep their names (ours are GPT-2's); the four Conv1D matrices are stored transposed as
Hugging Face keeps them, the LM head is left out (tied to the token embedding), and a model trained
with bias=False gets zero biases, which compute the same. The tokenizer files are OpenAI's GPT-2 BPE
files as tiktoken caches them (vocab.bpe is Hugging Face's merges.txt, encoder.json its vocab.json):
offline they are read from TIKTOKEN_CACHE_DIR, so the folder's tokenizer is the one the model was
trained with. After writing, the folder is loaded back with GPT.from_pretrained and its logits are
checked to equal the checkpoint's.
"""

import argparse
import dataclasses
import json
import os
import sys

from cocomix.interrupt import on_ctrl_c

if __name__ == "__main__":  # Ctrl-C in the start-up (the imports below): one line, exit 130
    on_ctrl_c("the export folder may be incomplete; run the command again")

import torch

from cocomix.corpus import EOT
from cocomix.weights import GPT2_CONV1D, save_safetensors, write_atomic
from model import GPT, load_checkpoint

# where tiktoken gets GPT-2's BPE files (and the SHA-256 it checks them against); its cache names
# them by the SHA-1 of these addresses
BPE_FILES = {
    "merges.txt": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "vocab.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
SPECIAL = "<|endoftext|>"


def hf_config(config):
    """config.json of Hugging Face's GPT2LMHeadModel for our GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh GELU, as model.MLP
        "layer_norm_epsilon": config.ln_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "torch_dtype": "float32",
    }


def hf_state_dict(model):
    """The model's weights under GPT2LMHeadModel's names and layout (the reverse of
    weights.copy_gpt2_weights)."""
    sd = {
        k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied to wte: stored once
    with torch.device("meta"):  # the same model with biases, for their names and shapes only
        full = GPT(dataclasses.replace(model.config, bias=True)).state_dict()
    out = {}
    for k, ref in full.items():
        if k == "lm_head.weight":
            continue
        w = sd[k] if k in sd else torch.zeros(ref.shape, dtype=sd["transformer.wte.weight"].dtype)
        out[k] = (w.t() if k.endswith(GPT2_CONV1D) else w).float().contiguous()
    return out


def write_tokenizer(out_dir, block_size):
    import tiktoken.load

    for name, (url, sha256) in BPE_FILES.items():
        try:
            data = tiktoken.load.read_file_cached(url, sha256)
        except Exception as e:  # offline without the cache, or a corrupted cache file
            raise RuntimeError(
                f"GPT-2's BPE file {url.rsplit('/', 1)[1]} is unavailable ({type(e).__name__}); "
                "offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files"
            ) from None
        write_atomic(os.path.join(out_dir, name), data)
    special = dict(bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        dict(
            tokenizer_class="GPT2Tokenizer",
            model_max_length=block_size,
            add_prefix_space=False,
            add_bos_token=False,
            **special,
        ),
    )


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def export(ckpt_path, out_dir):
    """Write the Hugging Face GPT-2 folder of a plain GPT checkpoint; returns the model. ValueError
    if the checkpoint is not a plain GPT."""
    model, _ = load_checkpoint(ckpt_path)
    c = model.config
    if c.has_insert_layer:
        what = (
            "the pause baseline"
            if c.pause
            else f"a CoCoMix student ({c.n_concepts} concepts, mix={c.mix})"
        )
        raise ValueError(
            f"{ckpt_path} is {what}, not a GPT-2 model: Hugging Face's GPT-2 has no concept head "
            "or concept slots, so only NTP and KD students (and concept sources) export; evaluate "
            "it with python -m scripts.eval"
        )
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir, c.block_size)
    write_json(os.path.join(out_dir, "config.json"), hf_config(c))
    save_safetensors(
        hf_state_dict(model), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"}
    )
    # the folder must compute what the checkpoint computes: read it back as any user would
    idx = torch.arange(min(c.block_size, 64)).unsqueeze(0) % c.vocab_size
    with torch.no_grad():
        if not torch.equal(GPT.from_pretrained(out_dir).eval()(idx)[0], model(idx)[0]):
            raise RuntimeError(
                f"{out_dir}: the exported weights do not give the checkpoint's logits"
            )
    return model


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Export an NTP/KD checkpoint as a Hugging Face GPT-2 folder."
    )
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint saved by train.py (or its run folder)"
    )
    p.add_argument("--out", help="the folder to write (default: hf/ next to the checkpoint)")
    args = p.parse_args(argv)
    ckpt = os.path.join(args.ckpt, "ckpt.pt") if os.path.isdir(args.ckpt) else args.ckpt
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "hf")
    try:
        model = export(ckpt, out)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"wrote {out}: GPT-2 with {model.get_num_params() / 1e6:.2f}M parameters, block_size "
        f"{model.config.block_size}; the round trip "
        "through GPT.from_pretrained gives identical logits"
    )


if __name__ == "__main__":
    main()
