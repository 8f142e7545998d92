"""Tests for cocomix/evaluate.py and scripts/eval.py: every metric against a hand computation with
single unbatched forward passes."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cocomix.corpus as corpus
import cocomix.evaluate as E
import scripts.eval as eval_cli
from cocomix.weights import save_atomic
from model import GPT, GPTConfig

REPO = Path(__file__).parent.parent

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
    seq = (ctx + cont)[-(model.config.block_size + 1) :]
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


def rolling_nll(model, stream, T):
    """(summed NLL, #targets) of stream[1:] after stream[0], by lm-eval's loglikelihood_rolling
    windows, written out independently: the first window predicts up to T tokens from the start;
    each later window predicts the next min(T, left) tokens from a context of exactly T inputs
    ending just before its last target, so the tail keeps a full context."""
    toks, prefix = [int(t) for t in stream[1:]], int(stream[0])
    first = min(T, len(toks))
    lp = logprobs(model, [prefix] + toks[:first])
    nll, done = -sum(lp[i, t].item() for i, t in enumerate(toks[:first])), first
    while done < len(toks):
        k, end = min(T, len(toks) - done), done + min(T, len(toks) - done)
        seq = toks[end - T - 1 : end]  # T inputs, then the window's last target
        lp = logprobs(model, seq)
        nll -= sum(lp[p, seq[p + 1]].item() for p in range(T - k, T))
        done = end
    return nll, len(toks)


@pytest.mark.parametrize(
    "n, block_size, batch_size, max_tokens",
    [
        (
            64 * 2 + 1 + 17,
            64,
            2,
            None,
        ),  # two full windows and a tail of 17 targets with a full context
        (64 * 3 + 1, 64, 2, None),  # only full windows, the last batch short
        (200, 16, 3, 50),  # shorter context than the model's, stream cut by max_tokens
        (40, 64, 4, None),  # shorter than one window
        (2, 64, 4, None),  # a single target
    ],
)
def test_evaluate_tokens_matches_hand_loop(model, n, block_size, batch_size, max_tokens):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 50257, size=n).astype(np.uint16)
    m = n if max_tokens is None else max_tokens
    nll, count = rolling_nll(model, tokens[:m], block_size)
    out = E.evaluate_tokens(
        model, tokens, block_size, batch_size, "cpu", max_tokens=max_tokens, progress=False
    )
    assert out["tokens"] == count == m - 1
    assert out["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # dropout is 0, so train mode gives the same numbers; the evaluation must switch and restore it
    model.train()
    again = E.evaluate_tokens(
        model, tokens, block_size, batch_size, "cpu", max_tokens=max_tokens, progress=False
    )
    assert again == out and model.training  # deterministic, and the caller's mode is kept
    model.eval()


def test_last_window_keeps_a_full_context(model):
    """The tail's first target is predicted from the block_size tokens before it, not from none."""
    tokens = np.random.default_rng(1).integers(0, 50257, size=16 + 1 + 3)
    out = E.evaluate_tokens(model, tokens, 16, 4, "cpu", progress=False)
    first = (
        -logprobs(model, [int(t) for t in tokens[:17]])
        .gather(1, torch.tensor(tokens[1:17]).unsqueeze(1))
        .sum()
        .item()
    )
    # 16 inputs, predicting tokens 4..19; the last 3 count
    tail = logprobs(model, [int(t) for t in tokens[3:20]])
    want = first - sum(tail[p, int(tokens[p + 4])].item() for p in (13, 14, 15))
    cold = first - sum(
        logprobs(model, [int(t) for t in tokens[16:20]])[p, int(tokens[p + 17])].item()
        for p in range(3)
    )
    assert out["loss"] * out["tokens"] == pytest.approx(want, rel=1e-5)
    assert abs(want - cold) > 1e-3  # the two rules differ here, so the test tells them apart


def test_token_byte_lengths_match_decode_bytes():
    lens = corpus.token_byte_lengths(enc)
    tokens = (
        enc.encode_ordinary("Héllo wörld — naïve café ☕\n\n  end.")
        + [EOT]
        + enc.encode_ordinary("ünïcode")
    )
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
    ref = E.evaluate_tokens(
        model, np.array([EOT] + enc.encode_ordinary(text)), 64, 4, "cpu", progress=False
    )
    assert out["loss"] == ref["loss"]
    # no leading or trailing whitespace here: lm-eval's count is the plain word count
    words = len(text.split())
    assert out["words"] == words and len(re.split(r"\s+", text)) == words
    assert out["word_ppl"] == pytest.approx(math.exp(out["loss"] * ntok / words), rel=1e-9)
    assert out["byte_ppl"] == pytest.approx(math.exp(out["loss"] * ntok / nbytes), rel=1e-9)
    assert "word_ppl" not in E.evaluate_text(
        model, path, enc, 64, 4, "cpu", max_tokens=20, progress=False
    )


def prepared_dir(tmp_path, docs, meta_overrides=None):
    d = tmp_path / "data"
    d.mkdir()
    tokens = [t for doc in docs for t in enc.encode_ordinary(doc) + [EOT]]
    np.array(tokens, dtype=np.uint16).tofile(d / "val.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, **(meta_overrides or {})}
    (d / "meta.json").write_text(json.dumps(meta))
    return d, tokens


def test_token_files_without_meta_json_are_read_with_a_warning(tmp_path):
    """prepare.py writes meta.json last: a folder without one is an unfinished run or another tool's
    files, whose dtype and sizes cannot be checked. Read (nanoGPT's own prepare writes none), but
    not in silence."""
    d, tokens = prepared_dir(tmp_path, ["One document."])
    (d / "meta.json").unlink()
    with pytest.warns(UserWarning, match="has no meta.json"):
        assert corpus.load_tokens(d, "val").tolist() == tokens


def test_bpb_of_prepared_split_excludes_eot_bytes(model, tmp_path):
    d, tokens = prepared_dir(
        tmp_path, ["First doc, ünïcode.", "Second document here.", "Third — last."]
    )
    stream = corpus.load_tokens(d, "val")
    out = E.evaluate_tokens(
        model, stream, 64, 2, "cpu", token_bytes=corpus.token_byte_lengths(enc), progress=False
    )
    targets = tokens[1:]
    nbytes = len(enc.decode_bytes([t for t in targets if t != EOT]))
    assert out["bytes"] == nbytes
    assert out["bpb"] == pytest.approx(
        out["loss"] * len(targets) / (math.log(2) * nbytes), rel=1e-9
    )


@pytest.mark.parametrize(
    "meta, val_bin, split, msg",
    [
        ({"tokenizer": "llama"}, None, "val", "tokenizer 'llama'"),
        ({"vocab_size": 100277}, None, "val", "vocab_size 100277"),
        ({}, b"\x01\x00\x02", "val", "odd number of bytes"),  # not uint16 tokens
        ({}, np.array([5, 60000], dtype=np.uint16).tobytes(), "val", "token ids >= 50257"),
        ({}, b"", "val", "val.bin holds 0 tokens"),
        ({}, None, "train", "train.bin not found"),
    ],
)
def test_foreign_data_dir_is_refused(model, tmp_path, capsys, meta, val_bin, split, msg):
    """corpus.load_tokens' checks reach scripts.eval's user as one line on stderr and exit 1."""
    d, _ = prepared_dir(tmp_path, ["a doc"], meta)
    if val_bin is not None:
        (d / "val.bin").write_bytes(val_bin)
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    err = cli_error(capsys, f"--ckpt={ckpt}", f"--data_dir={d}", f"--split={split}", "--device=cpu")
    assert err.startswith("error: ") and msg in err, err


# -----------------------------------------------------------------------------
# LAMBADA and multiple choice


def test_lambada_matches_hand_computation(model, tmp_path):
    # a passage the model gets right: one whose greedy next token is a " word" (random weights, so
    # search)
    contexts = [
        "She looked at the old map and said",
        "He turned to the window",
        "The old man smiled at",
        "They walked along the river",
        "It was late when we",
        "In the morning the children",
    ]
    ctx, word = next(((c, w) for c in contexts if (w := greedy_word(model, c))), (None, None))
    assert word is not None, "no context gives a greedy word: add more contexts"
    long_ctx = " ".join(f"word{i}" for i in range(60))  # > 64 tokens: cut from the left
    texts = [
        f"{ctx} {word}",
        "He opened the door and saw the antidisestablishmentarianism",
        f"{long_ctx} finally",
    ]
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
    assert (
        E.evaluate_lambada(model, path, enc, 64, 2, "cpu", max_examples=1, progress=False)["acc"]
        == 1.0
    )


def lm_eval_encode(context, continuation):
    """lm-eval's tokenization of a (context, continuation) request, written out here apart from
    the evaluation: trailing whitespace of the context joins the continuation, the two are encoded
    as one string, and the continuation is what lies past the context's own token count. An empty
    context is <|endoftext|>."""
    if context == "":
        return [EOT], enc.encode_ordinary(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = enc.encode_ordinary(context + continuation), enc.encode_ordinary(context)
    return ctx, whole[len(ctx) :]


def lm_eval_scores(model, items):
    """(acc, acc_norm) by lm-eval's definitions for items (pairs of strings, gold, choice lengths or
    None): per choice the summed log-likelihood of the continuation tokens, one unbatched forward
    pass each."""
    acc = acc_norm = 0
    for pairs, gold, lengths in items:
        ll = np.array([-hand_continuation(model, *lm_eval_encode(c, x))[0] for c, x in pairs])
        acc += int(np.argmax(ll)) == gold
        if lengths is not None:
            acc_norm += int(np.argmax(ll / np.array(lengths, dtype=float))) == gold
    return acc / len(items), acc_norm / len(items)


@pytest.mark.parametrize("sep", [" ", ""])
def test_multiple_choice_matches_lm_eval_definitions(model, tmp_path, sep):
    items = [
        {
            "query": "Question: The capital of France is\nAnswer:",
            "choices": ["Paris", "London", "a very long city name"],
            "gold": 0,
        },
        {
            "query": "Water boils at ",
            "choices": ["100 degrees", "zero"],
            "gold": 1,
        },  # the space moves to the continuation
        {
            "query": "Say hello",
            "choices": ["world", "there"],
            "gold": 0,
        },  # with sep '': BPE merges across the boundary
        {
            "query": "",
            "choices": ["yes", "no", "maybe so", "ünïcode"],
            "gold": 3,
        },  # empty query: <|endoftext|> context
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", items)
    acc, acc_norm = lm_eval_scores(
        model,
        [
            (
                [(it["query"], sep + c) for c in it["choices"]],
                it["gold"],
                [len(c) for c in it["choices"]],
            )
            for it in items
        ],
    )
    for batch_size in (4, 11):  # padded batches, and everything in one batch
        out = E.evaluate_mc(model, path, enc, 64, batch_size, "cpu", progress=False, sep=sep)
        assert out == dict(acc=acc, acc_norm=acc_norm, n=4)


def test_encode_pair_is_the_joint_rule():
    for c, x in [
        ("Answer: ", "Paris"),
        ("Question: x\n", " y"),
        ("hello", "world"),
        ("", " hi"),
        ("a b", " c"),
    ]:
        ctx, cont = E.encode_pair(enc, c, x)
        assert (ctx or [EOT], cont) == lm_eval_encode(c, x)
    # where separate tokenization would differ: the context's space, and a merge across the boundary
    assert E.encode_pair(enc, "Answer: ", "Paris") == (
        enc.encode_ordinary("Answer:"),
        enc.encode_ordinary(" Paris"),
    )
    assert enc.encode_ordinary("Answer: ")[-1:] + enc.encode_ordinary(
        "Paris"
    ) != enc.encode_ordinary(" Paris")
    ctx, cont = E.encode_pair(enc, "hello", "world")
    assert (
        ctx == enc.encode_ordinary("hello")
        and ctx + cont != enc.encode_ordinary("helloworld")
        and cont == enc.encode_ordinary("helloworld")[len(ctx) :] != enc.encode_ordinary("world")
    )


def test_acc_norm_divides_by_the_choice_without_separator(model, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"query": "Q", "choices": ["a", "bbb"], "gold": 1}])
    monkeypatch.setattr(
        E, "score_continuations", lambda model, pairs, *a, **k: [(2.0, False), (5.0, False)]
    )
    # log-likelihoods -2 and -5: per character -2/1 < -5/3, so acc_norm takes "bbb"; counting the
    # separator (-2/2 > -5/4) would take "a"
    assert E.evaluate_mc(model, path, enc, 64, 4, "cpu", progress=False) == dict(
        acc=0.0, acc_norm=1.0, n=1
    )


# (file name, JSONL objects, the kind, and per item what the reader must make of it, written out by
# hand: (context, continuation) strings per choice, gold, the choices' lengths for acc_norm or None)
READER_CASES = [
    (
        "mc_lm_eval.jsonl",
        [{"query": "Question: Is fire hot?\nAnswer:", "choices": ["yes", "no"], "gold": 0}],
        "mc",
        [
            (
                [
                    ("Question: Is fire hot?\nAnswer:", " yes"),
                    ("Question: Is fire hot?\nAnswer:", " no"),
                ],
                0,
                [3, 2],
            )
        ],
    ),
    (
        "mc_foundry.jsonl",  # llm-foundry's ARC and PIQA queries: their task adds "\nAnswer: "
        [
            {
                "query": "Question: To measure galaxies, the unit is the",
                "choices": ["meter.", "light-year."],
                "gold": 1,
            },
            {
                "query": "Question: Open a jar\n",
                "choices": ["twist the lid", "bite the lid"],
                "gold": 0,
            },
        ],
        "mc",
        [
            (
                [
                    ("Question: To measure galaxies, the unit is the\nAnswer:", " meter."),
                    ("Question: To measure galaxies, the unit is the\nAnswer:", " light-year."),
                ],
                1,
                [6, 11],
            ),
            (
                [
                    ("Question: Open a jar\nAnswer:", " twist the lid"),
                    ("Question: Open a jar\nAnswer:", " bite the lid"),
                ],
                0,
                [13, 12],
            ),
        ],
    ),
    (
        "winogrande.jsonl",
        [
            {
                "sentence": "The trophy did not fit in the case because _ was too big.",
                "option1": "the trophy",
                "option2": "the case",
                "answer": "1",
            },
            {
                "sentence": "Ann thanked Mary because _ had helped.",
                "option1": "Ann",
                "option2": "Mary",
                "answer": 2,
            },
        ],
        "winogrande",
        [
            (
                [
                    ("The trophy did not fit in the case because the trophy", " was too big."),
                    ("The trophy did not fit in the case because the case", " was too big."),
                ],
                0,
                None,
            ),
            (
                [
                    ("Ann thanked Mary because Ann", " had helped."),
                    ("Ann thanked Mary because Mary", " had helped."),
                ],
                1,
                None,
            ),
        ],
    ),
    (
        "winograd_foundry.jsonl",
        [
            {
                "context_options": ["Paul called George but Paul", "Paul called George but George"],
                "continuation": "wasn't successful.",
                "gold": 0,
            }
        ],
        "winogrande",
        [
            (
                [
                    ("Paul called George but Paul", " wasn't successful."),
                    ("Paul called George but George", " wasn't successful."),
                ],
                0,
                None,
            )
        ],
    ),
    (
        "hellaswag.jsonl",
        [
            {
                "activity_label": "Removing ice from car",
                "ctx_a": "A man scrapes the window.",
                "ctx_b": "then",
                "ctx": "ignored when ctx_a and ctx_b are there",
                "endings": [", he drives off.", " he eats snow. "],
                "label": "0",
            },
            {
                "activity_label": "Home and Garden",
                "ctx_a": "[header] How to clean a grill [title] Scrub  the grates.",
                "ctx_b": "use a BRUSH",
                "endings": ["[step] Rinse with water.", "Burn it  off."],
                "label": 1,
            },
        ],
        "hellaswag",
        [
            (
                [
                    ("Removing ice from car: A man scrapes the window. Then", " , he drives off."),
                    ("Removing ice from car: A man scrapes the window. Then", " he eats snow."),
                ],
                0,
                [16, 13],
            ),
            # " [title]" -> ". ", other brackets dropped, double spaces halved; capitalize()
            # lowercases the rest
            (
                [
                    (
                        "Home and Garden: How to clean a grill. Scrub the grates. Use a brush",
                        "  Rinse with water.",
                    ),
                    (
                        "Home and Garden: How to clean a grill. Scrub the grates. Use a brush",
                        " Burn it off.",
                    ),
                ],
                1,
                [18, 12],
            ),
        ],
    ),
    (
        "siqa.jsonl",
        [
            {
                "context": "Tracy didn't go home that evening.",
                "question": "What does Tracy need to do before this?",
                "answerA": "make a new plan",
                "answerB": "go home",
                "answerC": "find somewhere to go",
                "label": "3",
            }
        ],
        "siqa",
        [
            (
                [
                    (
                        "Q: Tracy didn't go home that evening. "
                        "What does Tracy need to do before this?\nA:",
                        " " + a,
                    )
                    for a in ("make a new plan", "go home", "find somewhere to go")
                ],
                2,
                [15, 7, 20],
            )
        ],
    ),
    (
        "arc.jsonl",
        [
            {
                "id": "a",
                "question": {
                    "stem": "Which is a gas?",
                    "choices": [  # AI2's release
                        {"text": "oxygen", "label": "A"},
                        {"text": "iron", "label": "B"},
                        {"text": "wood", "label": "C"},
                    ],
                },
                "answerKey": "A",
            },
            {
                "id": "b",
                "question": "Plants use sunlight to make",
                "answerKey": "2",  # Hugging Face's
                "choices": {"text": ["soil.", "food."], "label": ["1", "2"]},
            },
        ],
        "arc",
        [
            (
                [
                    ("Question: Which is a gas?\nAnswer:", " " + t)
                    for t in ("oxygen", "iron", "wood")
                ],
                0,
                [6, 4, 4],
            ),
            (
                [
                    ("Question: Plants use sunlight to make\nAnswer:", " soil."),
                    ("Question: Plants use sunlight to make\nAnswer:", " food."),
                ],
                1,
                [5, 5],
            ),
        ],
    ),
    (
        "piqa.jsonl",
        [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bite the lid", "label": 0}],
        "piqa",
        [
            (
                [
                    ("Question: Open a jar\nAnswer:", " twist the lid"),
                    ("Question: Open a jar\nAnswer:", " bite the lid"),
                ],
                0,
                [13, 12],
            )
        ],
    ),
]


@pytest.mark.parametrize("name, lines, kind, want", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader(model, tmp_path, name, lines, kind, want):
    path = write_jsonl(tmp_path / name, lines)
    assert E.read_benchmark(path, E.CHOICE_KINDS) == (kind, want)
    assert E.file_kind(str(path)) == (kind, None)
    acc, acc_norm = lm_eval_scores(model, want)
    out = E.evaluate_mc(model, path, enc, 64, 3, "cpu", progress=False)
    assert out == (
        dict(acc=acc, n=len(want))
        if kind == "winogrande"
        else dict(acc=acc, acc_norm=acc_norm, n=len(want))
    )


def test_lambada_readers_agree(model, tmp_path):
    """OpenAI's {"text"} and llm-foundry's {"context", "continuation"} (with or without the space on
    either side) are the same items, scored as lm-eval's lambada_openai."""
    texts = ["The old man smiled at his dog", "She opened the door and saw the sea"]
    forms = {
        "openai": [{"text": t} for t in texts],
        "foundry": [
            {"context": t.rsplit(" ", 1)[0], "continuation": t.rsplit(" ", 1)[1]} for t in texts
        ],
        "spaced": [
            {"context": t.rsplit(" ", 1)[0] + " ", "continuation": t.rsplit(" ", 1)[1]}
            for t in texts
        ],
        "leading": [
            {"context": t.rsplit(" ", 1)[0], "continuation": " " + t.rsplit(" ", 1)[1]}
            for t in texts
        ],
    }
    hand = [
        hand_continuation(model, *lm_eval_encode(t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]))
        for t in texts
    ]
    for form, lines in forms.items():
        # {"text"}: LAMBADA only by its name
        path = write_jsonl(tmp_path / f"lambada_{form}.jsonl", lines)
        assert E.file_kind(str(path)) == ("lambada", None)
        out = E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)
        assert out["acc"] == sum(g for _, g in hand) / 2
        assert out["nll"] == pytest.approx(sum(n for n, _ in hand) / 2, rel=1e-5)


WIKI_RAW = (
    ' \n = Alpha = \n \n The cat @-@ like animal , named " Tom " , sat ( quietly ) . \n \n '
    "= = History = = \n"
    " \n It was 1 @,@ 000 years old . \n \n = Beta = \n \n Second article 's text : short . \n"
)
# the articles (cut at " = Title = ", not at the "= = Sub = =" heading) and, by hand, lm-eval's
# detokenized text
WIKI_ARTICLES = [
    ' = Alpha = \n \n The cat @-@ like animal , named " Tom " , sat ( quietly ) . \n \n '
    "= = History = = \n"
    " \n It was 1 @,@ 000 years old . \n ",
    " = Beta = \n \n Second article 's text : short . \n",
]
WIKI_DETOKENIZED = [
    ' = Alpha =\n\nThe cat-like animal, named "Tom", sat (quietly).\n\n== History ==\n\nIt was '
    "1,000 years old.\n",
    " = Beta =\n\nSecond article's text: short.\n",
]


def test_wikitext_word_perplexity(model, tmp_path):
    assert E.wikitext_articles(WIKI_RAW) == WIKI_ARTICLES
    assert [E.wikitext_detokenize(a) for a in WIKI_ARTICLES] == WIKI_DETOKENIZED
    nll = tokens = 0
    for (
        text
    ) in WIKI_DETOKENIZED:  # each article its own document, <|endoftext|> first; windows of 16
        n, t = rolling_nll(model, [EOT] + enc.encode_ordinary(text), 16)
        nll, tokens = nll + n, tokens + t
    assert tokens > 2 * 16  # several windows and a short tail
    words = sum(len(re.split(r"\s+", a)) for a in WIKI_ARTICLES)  # counted on the original articles
    nbytes = sum(len(a.encode()) for a in WIKI_ARTICLES)
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(WIKI_RAW, encoding="utf-8")
    pages = write_jsonl(tmp_path / "wikitext.jsonl", [{"page": a} for a in WIKI_ARTICLES])
    for path in (raw, pages):
        assert E.file_kind(str(path))[0] == "wikitext"
        out = E.evaluate_file(
            model,
            str(path),
            "wikitext",
            enc,
            16,
            3,
            "cpu",
            token_bytes=corpus.token_byte_lengths(enc),
            progress=False,
        )
        assert (out["n"], out["tokens"], out["words"], out["bytes"]) == (2, tokens, words, nbytes)
        assert out["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-5)
        assert out["byte_ppl"] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
        assert out["bpb"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)


def test_crlf_and_lf_files_score_the_same(model, tmp_path):
    """Universal newlines, as Python's text mode (and so lm-eval) reads a file: the same WikiText
    article and the same text saved with CRLF and with LF line endings (WikiText-2's wiki.test.raw
    is distributed with CRLF) give the same perplexities and bits per byte."""
    tb = corpus.token_byte_lengths(enc)
    texts = {"wiki.test.raw": WIKI_RAW, "story.txt": "One line.\nAnother line,\n\nand a third.\n"}
    for name, text in texts.items():
        outs = []
        for eol in ("\n", "\r\n"):
            folder = tmp_path / ("crlf" if eol == "\r\n" else "lf")
            folder.mkdir(exist_ok=True)
            (folder / name).write_bytes(text.replace("\n", eol).encode("utf-8"))
            kind = E.file_kind(str(folder / name))[0]
            assert kind == ("wikitext" if name.endswith(".raw") else "text")
            outs.append(
                E.evaluate_file(
                    model,
                    str(folder / name),
                    kind,
                    enc,
                    16,
                    3,
                    "cpu",
                    token_bytes=tb,
                    progress=False,
                )
            )
        lf, crlf = outs
        assert lf.keys() == crlf.keys() and {"word_ppl", "byte_ppl", "bpb"} <= lf.keys()
        for k in lf:
            assert crlf[k] == pytest.approx(lf[k], rel=1e-6, abs=1e-9), (name, k)


def test_lambada_pair_is_joined_by_one_space(model, tmp_path):
    """llm-foundry's {"context", "continuation"} LAMBADA is joined with one space, as llm-foundry
    and lm-eval do, also where the continuation starts with "\n\n" (item 4462 of the test set): the
    same request and the same score as OpenAI's {"text"} form of the passage."""
    ctx, cont = "She raised her brows when she returned and saw the", "\n\nrecorder"
    pair = write_jsonl(tmp_path / "lambada_foundry.jsonl", [{"context": ctx, "continuation": cont}])
    text = write_jsonl(tmp_path / "lambada_openai.jsonl", [{"text": f"{ctx} {cont}"}])
    for path in (pair, text):
        assert E.read_benchmark(path, ("lambada",)) == ("lambada", [([(ctx, " " + cont)], 0, None)])
    hand = hand_continuation(model, *lm_eval_encode(ctx, " " + cont))
    for path in (pair, text):
        out = E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)
        assert out["nll"] == pytest.approx(hand[0], rel=1e-6) and out["acc"] == hand[1]


def test_score_continuations_batched_equals_unbatched(model):
    pairs = [
        (enc.encode_ordinary("Once upon a time"), enc.encode_ordinary(" there was")),
        (enc.encode_ordinary("x " * 100), enc.encode_ordinary(" end")),
        ([], enc.encode_ordinary(" hello world")),
    ]
    got = E.score_continuations(model, pairs, 64, 3, "cpu", progress=False)
    for (ctx, cont), (nll, greedy) in zip(pairs, got):
        want = hand_continuation(model, ctx or [EOT], cont)
        assert nll == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]


# -----------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "lines, msg",
    [
        (['{"text": "a b"}', '{"text": "a b"'], r"bad\.jsonl:2: malformed JSON"),
        (['{"text": "a b"}', "", '{"txt": "a b"}'], r"bad\.jsonl:3: missing key\(s\) 'text'"),
        (['["a b"]'], r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_lambada_file_errors(model, tmp_path, lines, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(E.EvalError, match=msg):
        E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)


@pytest.mark.parametrize(
    "item, msg",
    [
        (
            {"query": "q", "choices": [" a", " b"], "gold": 2},
            r"mc\.jsonl:1: gold=2 is not an index",
        ),
        ({"query": "q", "choices": [" a", " b"], "gold": True}, r"mc\.jsonl:1: gold=True"),
        ({"query": "q", "choices": [" a", " b"]}, r"mc\.jsonl:1: missing key\(s\) 'gold'"),
        ({"query": "q", "choices": [], "gold": 0}, r"mc\.jsonl:1: 'query' must be a string"),
        # an older convention of this evaluation (the space inside the choice) would now get a
        # second space: refused
        (
            {"query": "q", "choices": [" a", " b"], "gold": 0},
            r"mc\.jsonl:1: every choice starts with whitespace.*--mc_sep=''",
        ),
        (
            {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"},
            r"mc\.jsonl:1: 'sentence' has no '_'",
        ),
        (
            {"sentence": "_ ok", "option1": "a", "option2": "b", "answer": "3"},
            r"mc\.jsonl:1: answer='3' is not an index into its 2 choices \(1-based\)",
        ),
        (
            {
                "context": "c",
                "question": "q",
                "answerA": "a",
                "answerB": "b",
                "answerC": "c",
                "label": 0,
            },
            r"label=0 is not an index into its 3.*1-based",
        ),
        (
            {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"},
            r"answerKey 'B' is not one of",
        ),
        ({"goal": "g", "sol1": "a", "sol2": "b"}, r"mc\.jsonl:1: missing key\(s\) 'label'"),
        ({"endings": ["a"], "label": 0}, r"expected 'ctx_a' and 'ctx_b', or 'ctx'"),
        ({"text": "a b"}, r"mc\.jsonl: a lambada file, expected winogrande or"),
        (
            {"foo": 1, "bar": 2},
            r"mc\.jsonl:1: unknown benchmark format \(keys bar, foo\); expected one of: "
            r".*\{query, choices, gold\}",
        ),
    ],
)
def test_mc_item_errors(model, tmp_path, item, msg):
    path = write_jsonl(tmp_path / "mc.jsonl", [item])
    with pytest.raises(E.EvalError, match=msg):
        E.evaluate_mc(model, path, enc, 64, 2, "cpu", progress=False)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "scripts.eval", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )


def test_cli_end_to_end(model, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS, "iter_num": 7}, ckpt)
    (tmp_path / "t.txt").write_text("Some text to evaluate, with a few words. " * 5)
    write_jsonl(
        tmp_path / "l.jsonl",
        [{"text": "The cat sat on the mat"}, {"text": "A dog ran to the park"}],
    )
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "Pick", "choices": ["one", "two"], "gold": 0}])
    d, _ = prepared_dir(tmp_path, ["one document", "another document"])
    out = tmp_path / "res" / "r.json"
    r = run_cli(
        f"--ckpt={ckpt}",
        f"--data_dir={d}",
        "--text",
        str(tmp_path / "t.txt"),
        f"--lambada={tmp_path / 'l.jsonl'}",
        f"--mc={tmp_path / 'mc.jsonl'}",
        "--device=cpu",
        f"--json_out={out}",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["iter_num"] == 7 and set(res["results"]) == {"val", "text:t.txt", "lambada", "mc:mc"}
    assert res["results"]["text:t.txt"]["bytes"] == len(
        "Some text to evaluate, with a few words. " * 5
    )
    assert "lambada" in r.stdout and "acc_norm" in r.stdout


def cli_error(capsys, *args):
    """main() in this process (a subprocess per case is slow): the one stderr line of a failure."""
    with pytest.raises(SystemExit) as e:
        eval_cli.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_cli_errors(model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    (tmp_path / "t.txt").write_text("text")
    assert (
        cli_error(capsys, f"--ckpt={tmp_path / 'nope.pt'}", "--text", str(tmp_path / "t.txt"))
        == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\nnot json\n')
    assert f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in cli_error(
        capsys, f"--ckpt={ckpt}", f"--lambada={tmp_path / 'bad.jsonl'}", "--device=cpu"
    )
    d, _ = prepared_dir(tmp_path, ["a doc"], {"tokenizer": "cl100k_base"})
    assert "tokenizer 'cl100k_base'" in cli_error(
        capsys, f"--ckpt={ckpt}", f"--data_dir={d}", "--device=cpu"
    )
    assert "nothing to evaluate" in cli_error(capsys, f"--ckpt={ckpt}")


def test_unknown_and_non_utf8_files_are_one_line_errors(model, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "answer": "a"}])
    err = cli_error(capsys, f"--ckpt={ckpt}", f"--mc={tmp_path / 'odd.jsonl'}", "--device=cpu")
    assert (
        "odd.jsonl:1: unknown benchmark format (keys answer, prompt)" in err
        and "{goal, sol1, sol2, label}" in err
    )
    (tmp_path / "latin1.jsonl").write_bytes(
        '{"text": "a b"}\n{"text": "caf\u00e9 au lait"}\n'.encode("latin-1")
    )
    for flag in ("--lambada", "--suite"):
        path = tmp_path / ("latin1.jsonl" if flag == "--lambada" else "")
        err = cli_error(capsys, f"--ckpt={ckpt}", f"{flag}={path}", "--device=cpu")
        assert "latin1.jsonl" in err and "not UTF-8" in err, err


def test_suite(model, tmp_path, capsys):
    """Every benchmark file of a folder, recognised by content; other files listed, not fatal; one
    Markdown table and JSON next to the checkpoint, equal to evaluating each file on its own."""
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, lines, *_ in READER_CASES[:3] + READER_CASES[-2:]:
        write_jsonl(bench / name, lines)
    write_jsonl(
        bench / "lambada_openai.jsonl", [{"context": "The cat sat on the", "continuation": "mat"}]
    )
    (bench / "wiki.test.raw").write_text(WIKI_RAW, encoding="utf-8")
    (bench / "story.txt").write_text("Once upon a time there was a cat. " * 4)
    (bench / "README.md").write_text("notes")
    write_jsonl(bench / "odd.jsonl", [{"prompt": "p"}])
    (bench / "array.json").write_text('[{"text": "a b"}]')
    write_jsonl(
        bench / "corpus.jsonl", [{"text": "A pretraining document, not a LAMBADA passage."}]
    )
    (bench / "sub").mkdir()
    eval_cli.main([f"--ckpt={ckpt}", f"--suite={bench}", "--device=cpu", "--batch_size=3"])
    table = capsys.readouterr().out
    record = json.loads((ckpt.parent / "eval_suite.json").read_text())
    assert (ckpt.parent / "eval_suite.md").read_text() == table
    assert set(record["results"]) == {
        "mc:mc_lm_eval",
        "mc:mc_foundry",
        "winogrande:winogrande",
        "arc:arc",
        "piqa:piqa",
        "lambada:lambada_openai",
        "wikitext:wiki.test",
        "text:story",
    }
    assert {s["file"]: s["why"] for s in record["skipped"]} == {
        "README.md": "not .jsonl, .json or .txt, .raw, .tokens",
        "sub": "a folder",
        "array.json": "not JSON Lines of objects",
        "odd.jsonl": E.unknown_format({"prompt": "p"}),
        "corpus.jsonl": (
            "{\"text\"} lines, LAMBADA's format and any corpus's: "
            "read as LAMBADA only in a file named lambada*"
        ),
    }
    lines = table.splitlines()
    assert (
        lines[0].startswith("| task | n | acc | acc_norm |")
        and len([l for l in lines if l.startswith("| ")]) == 9
    )
    assert lines[-1].startswith("Not evaluated: README.md")
    # two --text files of one name, and a suite key met again: each kept under a longer key, none
    # overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "story.txt").write_text("A different story about a dog. " * 4)
    eval_cli.main(
        [
            f"--ckpt={ckpt}",
            "--device=cpu",
            "--batch_size=3",
            "--text",
            str(bench / "story.txt"),
            str(tmp_path / "other" / "story.txt"),
            "--mc",
            str(bench / "mc_lm_eval.jsonl"),
            f"--suite={bench}",
        ]
    )
    capsys.readouterr()
    keys = set(json.loads((ckpt.parent / "eval_suite.json").read_text())["results"])
    assert {
        "text:story.txt",
        f"text:{tmp_path / 'other' / 'story.txt'}",
        "mc:mc_lm_eval",
        "suite:mc:mc_lm_eval",
        "text:story",
    } <= keys
    tb = corpus.token_byte_lengths(enc)
    assert {k: r["definition"] for k, r in record["results"].items()} == {
        "mc:mc_lm_eval": "as given: the file's query and choices (not checked against a "
        "benchmark's definition)",
        "mc:mc_foundry": 'lm-eval arc / piqa prompt (llm-foundry\'s file, "\\nAnswer:" added)',
        "winogrande:winogrande": "lm-eval winogrande",
        "arc:arc": "lm-eval arc_easy / arc_challenge",
        "piqa:piqa": "lm-eval piqa",
        "lambada:lambada_openai": "lm-eval lambada_openai (llm-foundry's file)",
        "wikitext:wiki.test": "lm-eval wikitext",
        "text:story": "rolling perplexity of the file as one document",
    }
    assert lines[0].endswith("| scored as |") and "| lm-eval piqa |" in table
    for key, r in record["results"].items():
        del r["definition"]
        kind, path = key.split(":")[0], str(bench / r.pop("file"))
        assert r == pytest.approx(
            E.evaluate_file(model, path, kind, enc, 64, 5, "cpu", token_bytes=tb, progress=False),
            rel=1e-9,
        )
    assert (
        "word_ppl" in record["results"]["wikitext:wiki.test"]
        and "word_ppl" in record["results"]["text:story"]
    )


def test_suite_survives_a_bad_file(model, tmp_path, capsys):
    """A suite folder with good files and broken ones (a malformed line; a continuation longer
    than the block): the good files are scored and written to the JSON and the Markdown, each
    broken file is named there with its line and the reason, and the exit status is 1."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    bench = tmp_path / "bench"
    bench.mkdir()
    name, lines, *_ = READER_CASES[-1]  # piqa
    write_jsonl(bench / name, lines)
    (bench / "arc_broken.jsonl").write_text(
        json.dumps(READER_CASES[-2][1][1]) + "\n" + '{"question": "cut off\n'
    )
    long_choice = " ".join(["word"] * 80)  # > 64 tokens
    write_jsonl(
        bench / "hellaswag_long.jsonl",
        [{"ctx": "A man", "endings": ["walks.", "runs."], "label": 0}]
        + [{"ctx": "A woman", "endings": ["sits.", long_choice], "label": 1}],
    )
    out = tmp_path / "suite.json"
    with pytest.raises(SystemExit) as e:
        eval_cli.main([f"--ckpt={ckpt}", f"--suite={bench}", "--device=cpu", f"--out={out}"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"piqa:piqa"}
    failed = {f["file"]: f["why"] for f in record["failed"]}
    assert set(failed) == {"arc_broken.jsonl", "hellaswag_long.jsonl"}
    assert failed["arc_broken.jsonl"].startswith(f"{bench / 'arc_broken.jsonl'}:2: malformed JSON")
    assert failed["hellaswag_long.jsonl"] == (
        f"{bench / 'hellaswag_long.jsonl'}:2: continuation of 80 tokens does not fit block_size=64"
    )
    table = (tmp_path / "suite.md").read_text()
    assert "| piqa:piqa |" in table and "Failed: arc_broken.jsonl (" in table
    assert f"{bench / 'hellaswag_long.jsonl'}:2: continuation of 80 tokens" in table
    for name, why in failed.items():
        assert f"error: --suite file {name} failed: {why}" in err


def test_continuation_too_long_names_the_file_and_line(model, tmp_path):
    long_word = " ".join(["word"] * 80)
    path = write_jsonl(
        tmp_path / "lambada_long.jsonl", [{"text": "a b"}, {"text": f"The end is {long_word}"}]
    )
    path.write_text(path.read_text().replace(" word word", "-word-word"))  # one 80-part word
    with pytest.raises(
        E.EvalError, match=rf"^{re.escape(str(path))}:2: continuation of \d+ tokens"
    ):
        E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)


# (file, first object, what the suite row says it is scored as)
DEFINITION_CASES = [
    (
        "siqa_foundry.jsonl",
        {
            "query": "Context: Tracy didn't go home.\nQuestion: What does Tracy need to do before "
            "this?\nChoices:\nA. Find somewhere to go\nB. make a new plan\nAnswer:",
            "gold": 0,
            "choices": ["A", "B"],
        },
        "variant: llm-foundry's SIQA, 2 of the 3 answers listed in the query and scored by their "
        "letter (lm-eval's siqa scores the 3 answers' text)",
    ),
    (
        "copa_foundry.jsonl",
        {
            "query": "The man turned on the faucet, therefore",
            "gold": 1,
            "choices": ["the toilet filled with water.", "water flowed from the spout."],
        },
        "variant: llm-foundry's COPA prompt (\"premise, because\"; lm-eval's copa has no comma)",
    ),
    ("siqa.jsonl", READER_CASES[-3][1][0], "lm-eval siqa"),
    ("hellaswag.jsonl", READER_CASES[4][1][0], "lm-eval hellaswag"),
    (
        "winograd_foundry.jsonl",
        READER_CASES[3][1][0],
        "lm-eval winogrande, partial scoring (llm-foundry's file)",
    ),
]


def test_suite_rows_say_what_they_are_scored_as(model, tmp_path):
    """Each suite row says whether it is the paper's benchmark scored by lm-eval's definition or a
    variant: llm-foundry's SIQA (2 of 3 answers, lettered) and COPA prompt are variants."""
    for name, item, want in DEFINITION_CASES:
        write_jsonl(tmp_path / name, [item])
    results, skipped, failed = E.evaluate_suite(model, tmp_path, enc, 64, 4, "cpu", progress=False)
    assert not skipped and not failed
    got = {r["file"]: r["definition"] for r in results.values()}
    assert got == {name: want for name, _, want in DEFINITION_CASES}
    assert "mc:siqa_foundry" in results and "variant: llm-foundry's SIQA" in E.markdown_table(
        results
    )


# files of benchmarks not implemented here, some with ARC's keys: refused by name
REFUSED_CASES = [
    (
        "CommonsenseQA",
        {
            "id": "075e483d21c29a511267ef62bedc0461",
            "question": "The sanctions against the school were a punishing blow, and they seemed to"
            " what the efforts the school had made to change?",
            "question_concept": "punishing",
            "choices": {"label": ["A", "B"], "text": ["ignore", "enforce"]},
            "answerKey": "A",
        },
    ),
    (
        "OpenBookQA",
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": ["puppies learning new tricks", "plants sprouting"],
                "label": ["A", "B"],
            },
            "answerKey": "B",
        },
    ),
    (
        "OpenBookQA",
        {
            "id": "7-980",
            "question": {
                "stem": "The sun is responsible for",
                "choices": [{"text": "puppies", "label": "A"}, {"text": "plants", "label": "B"}],
            },
            "answerKey": "B",
        },
    ),
    (
        "MMLU",
        {
            "question": "2 + 2 =",
            "subject": "elementary_mathematics",
            "choices": ["3", "4"],
            "answer": 1,
        },
    ),
]


@pytest.mark.parametrize(
    "name, item", REFUSED_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REFUSED_CASES)]
)
def test_unimplemented_formats_are_refused_by_name(model, tmp_path, name, item):
    path = write_jsonl(tmp_path / "bench.jsonl", [item])
    why = f"{name}: not implemented here (refused rather than scored as another benchmark)"
    assert E.file_kind(str(path)) == (None, why)
    with pytest.raises(E.EvalError, match=re.escape(f"{path}:1: {why}")):
        E.evaluate_mc(model, path, enc, 64, 2, "cpu", progress=False)


def test_lambada_flag_refuses_rows_that_are_not_lambada(model, tmp_path):
    """--lambada given WikiText's {"text"} line rows (Hugging Face's wikitext: headings and lines
    ending in "\n", empty rows) is refused at the first such row, not scored as LAMBADA."""
    rows = [
        {"text": " = Valkyria Chronicles III = \n"},
        {
            "text": " Senjō no Valkyria 3 : Unrecorded Chronicles "
            "is a tactical role @-@ playing game .\n"
        },
    ]
    for skip in (0, 1):
        path = write_jsonl(tmp_path / "lambada_wiki.jsonl", [{"text": "a b c"}] * skip + rows)
        with pytest.raises(E.EvalError, match=rf":{skip + 1}: not a LAMBADA passage"):
            E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)
    path = write_jsonl(tmp_path / "lambada_wiki.jsonl", [{"text": "Senjō no Valkyria ."}])
    with pytest.raises(E.EvalError, match=r":1: not a LAMBADA passage: it ends in"):
        E.evaluate_lambada(model, path, enc, 64, 2, "cpu", progress=False)


def test_suite_reads_bom_and_gz_files_as_the_plain_files(model, tmp_path):
    """A UTF-8 BOM (a Windows editor's leftover) and gzip change no number, as lm-eval's loader
    reads them: a BOM'd wiki.test.raw is still WikiText (split into articles, detokenized), a BOM'd
    .jsonl and a .jsonl.gz are their plain file. A broken .jsonl fails --suite, named, exit 1."""
    import gzip

    cases = {name: lines for name, lines, *_ in READER_CASES if name in ("arc.jsonl", "piqa.jsonl")}
    plain, odd = tmp_path / "plain", tmp_path / "odd"
    plain.mkdir(), odd.mkdir()
    bom = "\ufeff".encode()
    (plain / "wiki.test.raw").write_text(WIKI_RAW, encoding="utf-8")
    (odd / "wiki.test.raw").write_bytes(bom + WIKI_RAW.encode())
    for name, lines in cases.items():
        data = write_jsonl(plain / name, lines).read_bytes()
        if name == "arc.jsonl":
            (odd / name).write_bytes(bom + data)
        else:
            (odd / (name + ".gz")).write_bytes(gzip.compress(bom + data))
    res = {}
    for folder in (plain, odd):
        results, skipped, failed = E.evaluate_suite(
            model, folder, enc, 64, 4, "cpu", progress=False
        )
        assert not skipped and not failed, (skipped, failed)
        res[folder] = {k: {m: v for m, v in r.items() if m != "file"} for k, r in results.items()}
    assert set(res[plain]) == {"wikitext:wiki.test", "arc:arc", "piqa:piqa"}
    assert res[odd] == res[plain]
    # a file that is not what its name says is a failure, not a skip
    (odd / "broken.jsonl").write_text("not json\n")
    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "model_args": MODEL_ARGS}, ckpt)
    with pytest.raises(SystemExit) as e:
        eval_cli.main([f"--ckpt={ckpt}", f"--suite={odd}", "--device=cpu"])
    assert e.value.code == 1
    record = json.loads((tmp_path / "eval_suite.json").read_text())
    assert [f["file"] for f in record["failed"]] == ["broken.jsonl"]
    assert "its first line is not JSON" in record["failed"][0]["why"]
