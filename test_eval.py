"""Tests for eval.py: every metric against a hand computation with single unbatched forward passes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).parent
SHARED = REPO.parent / "shared"
if (SHARED / "tiktoken").is_dir():  # offline copy of the gpt2 tokenizer files
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

import corpus  # noqa: E402
import eval as E  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

enc = corpus.tokenizer()
EOT = 50256
MODEL_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**MODEL_ARGS)).eval()


def logprobs(model, seq):
    """Log-probabilities (len(seq)-1, V) of one sequence, one forward pass, no batching."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq[:-1]]))
    return F.log_softmax(logits[0].float(), dim=-1)


def hand_continuation(model, ctx, cont):
    """(summed NLL of cont after ctx, greedy match), cutting ctx from the left to the window."""
    seq = (ctx + cont)[-(model.config.block_size + 1):]
    lp = logprobs(model, seq)
    pos = range(len(seq) - 1 - len(cont), len(seq) - 1)
    nll = -sum(lp[p, t].item() for p, t in zip(pos, cont))
    greedy = all(lp[p].argmax().item() == t for p, t in zip(pos, cont))
    return nll, greedy


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def greedy_word(model, context):
    """A ' word' that greedy decoding produces after context, or None."""
    t = logprobs(model, enc.encode_ordinary(context) + [0])[-1].argmax().item()
    s = enc.decode(enc.encode_ordinary(enc.decode([t])))
    if s.startswith(" ") and s[1:].isalpha() and enc.encode_ordinary(s) == [t]:
        return s[1:]
    return None

# -----------------------------------------------------------------------------
# token streams


@pytest.mark.parametrize("n, block_size, batch_size, max_tokens", [
    (64 * 2 + 1 + 17, 64, 2, None),   # two full windows and a partial one of 17 targets
    (64 * 3 + 1, 64, 2, None),        # only full windows, the last batch short
    (200, 16, 3, 50),                 # shorter context than the model's, stream cut by max_tokens
    (2, 64, 4, None),                 # a single target
])
def test_evaluate_tokens_matches_hand_loop(model, n, block_size, batch_size, max_tokens):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 50257, size=n).astype(np.uint16)
    m = n if max_tokens is None else max_tokens
    nll, count = 0.0, 0
    for s in range(0, m - 1, block_size):
        win = [int(t) for t in tokens[s:min(s + block_size + 1, m)]]
        lp = logprobs(model, win)
        nll -= sum(lp[i, t].item() for i, t in enumerate(win[1:]))
        count += len(win) - 1
    out = E.evaluate_tokens(model, tokens, block_size, batch_size, "cpu", max_tokens=max_tokens, progress=False)
    assert out["tokens"] == count == m - 1
    assert out["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    model.train()  # dropout is 0, so train mode gives the same numbers; eval.py must switch and restore it
    again = E.evaluate_tokens(model, tokens, block_size, batch_size, "cpu", max_tokens=max_tokens, progress=False)
    assert again == out and model.training  # deterministic, and the caller's mode is kept
    model.eval()


def test_token_byte_lengths_match_decode_bytes():
    lens = corpus.token_byte_lengths(enc)
    tokens = enc.encode_ordinary("Héllo wörld — naïve café ☕\n\n  end.") + [EOT] + enc.encode_ordinary("ünïcode")
    assert lens[EOT] == 0
    assert lens[tokens].sum() == len(enc.decode_bytes(tokens)) - len("<|endoftext|>")


def test_bpb_of_text_file(model, tmp_path):
    text = "The quick brown fox — naïve café, ☕ déjà vu. " * 6 + "\nThe end."
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    out = E.evaluate_text(model, path, enc, 64, 4, "cpu", progress=False)
    ntok, nbytes = len(enc.encode_ordinary(text)), len(text.encode("utf-8"))
    assert out["tokens"] == ntok and out["bytes"] == nbytes
    assert out["bpb"] == pytest.approx(out["loss"] * ntok / (math.log(2) * nbytes), rel=1e-9)
    # every text token is predicted, the first one from <|endoftext|>
    ref = E.evaluate_tokens(model, np.array([EOT] + enc.encode_ordinary(text)), 64, 4, "cpu", progress=False)
    assert out["loss"] == ref["loss"]


def prepared_dir(tmp_path, docs, meta_overrides=None):
    d = tmp_path / "data"
    d.mkdir()
    tokens = [t for doc in docs for t in enc.encode_ordinary(doc) + [EOT]]
    np.array(tokens, dtype=np.uint16).tofile(d / "val.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, **(meta_overrides or {})}
    (d / "meta.json").write_text(json.dumps(meta))
    return d, tokens


def test_bpb_of_prepared_split_excludes_eot_bytes(model, tmp_path):
    d, tokens = prepared_dir(tmp_path, ["First doc, ünïcode.", "Second document here.", "Third — last."])
    stream = corpus.load_tokens(d, "val")
    out = E.evaluate_tokens(model, stream, 64, 2, "cpu", token_bytes=corpus.token_byte_lengths(enc), progress=False)
    targets = tokens[1:]
    nbytes = len(enc.decode_bytes([t for t in targets if t != EOT]))
    assert out["bytes"] == nbytes
    assert out["bpb"] == pytest.approx(out["loss"] * len(targets) / (math.log(2) * nbytes), rel=1e-9)


@pytest.mark.parametrize("meta, val_bin, split, msg", [
    ({"tokenizer": "llama"}, None, "val", "tokenizer 'llama'"),
    ({"vocab_size": 100277}, None, "val", "vocab_size 100277"),
    ({}, b"\x01\x00\x02", "val", "odd number of bytes"),              # not uint16 tokens
    ({}, np.array([5, 60000], dtype=np.uint16).tobytes(), "val", "token ids >= 50257"),
    ({}, b"", "val", "val.bin holds 0 tokens"),
    ({}, None, "train", "train.bin not found"),
])
def test_foreign_data_dir_is_refused(model, tmp_path, capsys, meta, val_bin, split, msg):
    """corpus.load_tokens' checks reach eval.py's user as one line on stderr and exit 1."""
    d, _ = prepared_dir(tmp_path, ["a doc"], meta)
    if val_bin is not None:
        (d / "val.bin").write_bytes(val_bin)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    err = cli_error(capsys, f"--ckpt={ckpt}", f"--data_dir={d}", f"--split={split}", "--device=cpu")
    assert err.startswith("error: ") and msg in err, err

# -----------------------------------------------------------------------------
# LAMBADA and multiple choice


def test_lambada_matches_hand_computation(model, tmp_path):
    # a passage the model gets right: one whose greedy next token is a " word" (random weights, so search)
    contexts = ["She looked at the old map and said", "He turned to the window", "The old man smiled at",
                "They walked along the river", "It was late when we", "In the morning the children"]
    ctx, word = next(((c, w) for c in contexts if (w := greedy_word(model, c))), (None, None))
    assert word is not None, "no context gives a greedy word: add more contexts"
    long_ctx = " ".join(f"word{i}" for i in range(60))  # > 64 tokens: cut from the left
    texts = [f"{ctx} {word}", "He opened the door and saw the antidisestablishmentarianism", f"{long_ctx} finally"]
    path = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    hand = []
    for t in texts:
        c, w = t.rsplit(" ", 1)
        hand.append(hand_continuation(model, enc.encode_ordinary(c), enc.encode_ordinary(" " + w)))
    assert hand[0][1] and len(enc.encode_ordinary(long_ctx)) > 64
    for batch_size in (2, 8):  # padded batches of 2 and 1, then all in one batch
        out = E.evaluate_lambada(model, path, enc, 64, batch_size, "cpu", progress=False)
        assert out["n"] == 3
        assert out["acc"] == sum(g for _, g in hand) / 3
        mean_nll = sum(n for n, _ in hand) / 3
        assert out["nll"] == pytest.approx(mean_nll, rel=1e-5, abs=1e-5)
        assert out["ppl"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert E.evaluate_lambada(model, path, enc, 64, 2, "cpu", max_examples=1, progress=False)["acc"] == 1.0


def test_multiple_choice_matches_hand_computation(model, tmp_path):
    items = [
        {"query": "The capital of France is", "choices": [" Paris", " London", " a very long city name"], "gold": 0},
        {"query": "Water boils at", "choices": [" 100 degrees", " zero"], "gold": 1},
        {"query": "", "choices": [" yes", " no", " maybe so", " ünïcode"], "gold": 3},  # empty query: EOT context
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", items)
    acc = acc_norm = 0
    for it in items:
        q = enc.encode_ordinary(it["query"]) or [EOT]
        ll = [-hand_continuation(model, q, enc.encode_ordinary(c))[0] for c in it["choices"]]
        norm = [l / len(c) for l, c in zip(ll, it["choices"])]
        acc += int(np.argmax(ll)) == it["gold"]
        acc_norm += int(np.argmax(norm)) == it["gold"]
    for batch_size in (4, 9):
        out = E.evaluate_mc(model, path, enc, 64, batch_size, "cpu", progress=False)
        assert out == dict(acc=acc / 3, acc_norm=acc_norm / 3, n=3)


def test_score_continuations_batched_equals_unbatched(model):
    pairs = [(enc.encode_ordinary("Once upon a time"), enc.encode_ordinary(" there was")),
             (enc.encode_ordinary("x " * 100), enc.encode_ordinary(" end")),
             ([], enc.encode_ordinary(" hello world"))]
    got = E.score_continuations(model, pairs, 64, 3, "cpu", progress=False)
    for (ctx, cont), (nll, greedy) in zip(pairs, got):
        want = hand_continuation(model, ctx or [EOT], cont)
        assert nll == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]

# -----------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("lines, msg", [
    (['{"text": "a b"}', '{"text": "a b"'], r"bad\.jsonl:2: malformed JSON"),
    (['{"text": "a b"}', "", '{"txt": "a b"}'], r"bad\.jsonl:3: missing key\(s\) 'text'"),
    (['["a b"]'], r"bad\.jsonl:1: expected a JSON object"),
])
def test_lambada_file_errors(model, tmp_path, lines, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(E.EvalError, match=msg):
        E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)


@pytest.mark.parametrize("item, msg", [
    ({"query": "q", "choices": [" a", " b"], "gold": 2}, r"mc\.jsonl:1: gold=2 is not an index"),
    ({"query": "q", "choices": [" a", " b"], "gold": True}, r"mc\.jsonl:1: gold=True"),
    ({"query": "q", "choices": [" a", " b"]}, r"mc\.jsonl:1: missing key\(s\) 'gold'"),
    ({"query": "q", "choices": [], "gold": 0}, r"mc\.jsonl:1: 'query' must be a string"),
])
def test_mc_item_errors(model, tmp_path, item, msg):
    path = write_jsonl(tmp_path / "mc.jsonl", [item])
    with pytest.raises(E.EvalError, match=msg):
        E.evaluate_mc(model, path, enc, 64, 2, "cpu", progress=False)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, TQDM_DISABLE="1"))


def test_cli_end_to_end(model, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": MODEL_ARGS, "iter_num": 7}, ckpt)
    (tmp_path / "t.txt").write_text("Some text to evaluate, with a few words. " * 5)
    write_jsonl(tmp_path / "l.jsonl", [{"text": "The cat sat on the mat"}, {"text": "A dog ran to the park"}])
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "Pick", "choices": [" one", " two"], "gold": 0}])
    d, _ = prepared_dir(tmp_path, ["one document", "another document"])
    out = tmp_path / "res" / "r.json"
    r = run_cli(f"--ckpt={ckpt}", f"--data_dir={d}", "--text", str(tmp_path / "t.txt"), f"--lambada={tmp_path / 'l.jsonl'}",
                f"--mc={tmp_path / 'mc.jsonl'}", "--device=cpu", f"--json_out={out}")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["iter_num"] == 7 and set(res["results"]) == {"val", "text:t.txt", "lambada", "mc:mc"}
    assert res["results"]["text:t.txt"]["bytes"] == len("Some text to evaluate, with a few words. " * 5)
    assert "lambada" in r.stdout and "acc_norm" in r.stdout



def cli_error(capsys, *args):
    """main() in this process (a subprocess per case is slow): the one stderr line of a failure."""
    with pytest.raises(SystemExit) as e:
        E.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_cli_errors(model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    (tmp_path / "t.txt").write_text("text")
    assert cli_error(capsys, f"--ckpt={tmp_path / 'nope.pt'}", "--text", str(tmp_path / "t.txt")) == \
        f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\nnot json\n')
    assert f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in cli_error(capsys, f"--ckpt={ckpt}", f"--lambada={tmp_path / 'bad.jsonl'}", "--device=cpu")
    d, _ = prepared_dir(tmp_path, ["a doc"], {"tokenizer": "cl100k_base"})
    assert "tokenizer 'cl100k_base'" in cli_error(capsys, f"--ckpt={ckpt}", f"--data_dir={d}", "--device=cpu")
    assert "nothing to evaluate" in cli_error(capsys, f"--ckpt={ckpt}")
