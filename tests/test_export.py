"""Tests for export_hf.py and weights.save_safetensors: the exported folder computes what the
checkpoint computes, read back by our loader (bit for bit) and by transformers (when installed)."""

import json
import os

import pytest
import torch

import cocomix.corpus as corpus
import scripts.export_hf as export_hf
from cocomix.weights import load_safetensors, save_atomic, save_safetensors
from model import GPT, GPTConfig

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=50257)


def checkpoint(tmp_path, **overrides):
    """A checkpoint whose every weight is random (biases and LayerNorms too), so a misplaced or
    untransposed tensor changes the logits."""
    torch.manual_seed(0)
    args = dict(ARGS, **overrides)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir(exist_ok=True)
    save_atomic({"model": model.state_dict(), "model_args": args, "iter_num": 3}, path)
    return model.eval(), path


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_is_exact(tmp_path, capsys, bias):
    model, path = checkpoint(tmp_path, bias=bias)
    export_hf.main([f"--ckpt={path.parent}"])  # the run folder works too; default output: run/hf
    out = path.parent / "hf"
    assert "identical logits" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    back = GPT.from_pretrained(str(out)).eval()
    idx = torch.randint(0, 50257, (3, 48), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(back, idx), logits(model, idx))
    sd = load_safetensors(out / "model.safetensors")
    # Conv1D: (in, out)
    assert "lm_head.weight" not in sd and sd["transformer.h.0.attn.c_attn.weight"].shape == (
        32,
        96,
    )
    if not bias:  # zero biases stand in for the missing ones
        assert (
            not sd["transformer.h.1.mlp.c_fc.bias"].any() and not sd["transformer.ln_f.bias"].any()
        )
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["n_positions"],
        cfg["n_embd"],
        cfg["n_layer"],
        cfg["n_head"],
        cfg["activation_function"],
    ) == (48, 32, 2, 2, "gelu_new")


def test_transformers_loads_the_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, path = checkpoint(tmp_path)
    export_hf.export(str(path), str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(idx).logits
    # other kernels, same function
    torch.testing.assert_close(theirs, logits(model, idx), rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    enc = corpus.tokenizer()
    text = "Héllo wörld — naïve café ☕\n\n  it's 1,234.5 <|endoftext|>  trailing "
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == corpus.EOT and tok.model_max_length == 48


@pytest.mark.parametrize(
    "overrides, what",
    [
        (
            dict(n_concepts=64, concept_topk=8, insert_layer=1),
            "a CoCoMix student (64 concepts, mix=interleave)",
        ),
        (
            dict(n_concepts=64, concept_topk=8, insert_layer=1, mix="add"),
            "a CoCoMix student (64 concepts, mix=add)",
        ),
        (dict(pause=True, insert_layer=1), "the pause baseline"),
    ],
)
def test_cocomix_and_pause_are_refused(tmp_path, capsys, overrides, what):
    _, path = checkpoint(tmp_path, **overrides)
    with pytest.raises(SystemExit) as e:
        export_hf.main([f"--ckpt={path}", f"--out={tmp_path / 'hf'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert (
        err
        == f"error: {path} is {what}, not a GPT-2 model: Hugging Face's GPT-2 has no concept head "
        "or concept slots, so only NTP and KD students (and concept sources) export; evaluate "
        "it with python -m scripts.eval"
    )
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_safetensors_writer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(-3, 4),
        "b": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "t": torch.randn(4, 6, generator=g).t(),
    }
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # the data starts 8-byte aligned
    assert json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"] == {
        "format": "pt"
    }
    readers = [load_safetensors]
    try:  # the reference implementation too, when installed (transformers brings it)
        from safetensors.torch import load_file

        readers.append(load_file)
    except ImportError:
        pass
    for reader in readers:
        back = reader(str(path))
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
