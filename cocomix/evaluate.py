"""
Evaluation of any model: held-out loss / perplexity / bits per byte, LAMBADA, zero-shot multiple
choice, and the paper's zero-shot table from a folder of local benchmark files. The command line is
scripts/eval.py.

Every definition is lm-evaluation-harness's (0.4), so numbers compare with papers that use it;
checked against lm-eval 0.4.13 on a model exported by scripts/export_hf.py with local copies of its
task files: the same request strings item by item, log-likelihoods equal to float32 rounding, the
same acc, acc_norm, perplexities and bits per byte. All deterministic: no sampling, no shuffling.

Token streams and documents (rolling perplexity, lm-eval's loglikelihood_rolling):
- A stream is cut into windows of block_size+1 tokens that share one token with the next, so every
  token after the first is predicted exactly once, from the tokens before it in its window (no
  sliding). The last window, when the stream does not divide evenly, ends at the stream's end with a
  full block_size of context and counts only the targets not yet predicted. loss = mean NLL in nats.
- bpb = total NLL / (ln 2 * n_bytes), n_bytes the UTF-8 length of the predicted tokens' text.
  <|endoftext|> (50256) is predicted and its loss counted, but it is a separator, not text: 0 bytes.
- Text files are read with universal newlines, as Python's text mode (and so lm-eval) reads them:
  "\r\n" and "\r" become "\n", so a CRLF copy of a file gives the LF copy's numbers.
- A text file is one document: <|endoftext|> + its tokens (encode_ordinary), so every token of the
  file is predicted and n_bytes = len(text.encode()). word_ppl = exp(total NLL / n_words) with
  n_words = len(re.split(r"\\s+", text)), byte_ppl = exp(total NLL / n_bytes), as lm-eval reports
  for WikiText.
- WikiText (a wiki.test.raw file, or JSONL of {"page"}): the file is cut into articles at its
  top-level " = Title = " headings, each article is detokenized (" @-@ " -> "-", " , " -> ", ", ...,
  lm-eval's rules) and scored as its own document; words and bytes are counted on the original
  article. WikiText-2 and WikiText-103 share their test articles.

Continuations (LAMBADA, multiple choice):
- A (context, continuation) pair of strings is tokenized together: whitespace at the end of the
  context is moved to the start of the continuation (GPT-2's BPE attaches a space to the word after
  it), context+continuation is encoded as one string, and the continuation's tokens are those past
  the context's own token count. An empty context becomes <|endoftext|>. Contexts longer than the
  model's window are cut from the left.
- LAMBADA ({"text"}, OpenAI's file; or llm-foundry's {"context", "continuation"}, joined by one
  space as llm-foundry and lm-eval join them, also before a continuation that starts with "\n\n"):
  context = text up to the last space, continuation = " " + last word. A {"text"} row that does not
  end in a word (WikiText's rows end in "\n" or " .") is refused, not scored as LAMBADA. acc:
  greedy decoding reproduces every continuation token. ppl = exp(mean over examples of the
  continuation's summed NLL).
- Multiple choice: choice i is scored as the continuation sep + choice_i after the query (sep " ",
  lm-eval's target_delimiter; --mc_sep changes it for {"query", "choices", "gold"} files). acc:
  argmax of the summed log-likelihood; acc_norm: argmax of that sum divided by len(choice_i) in
  characters, the separator not counted. Ties go to the first choice.
- WinoGrande is scored by partial scoring: the contexts differ (the sentence up to "_" with each
  option filled in) and the continuation (the rest of the sentence) is the same, so only acc.

The benchmark files are read by cocomix/tasks.py (one reader per format, recognised from the first
line; benchmarks not implemented here are refused by name, see tasks.refused_format). A --suite row
says what it is scored as (tasks.definition): "lm-eval TASK" for the paper's benchmark by lm-eval's
definition, "variant: ..." for another form of it (llm-foundry's SIQA and COPA files). A suite file
that cannot be scored fails alone: the others are scored and written, the failed one is named with
its line and reason, and the command exits 1. Every error about an item names its file and line.
"""

import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from cocomix.corpus import EOT, token_byte_lengths
from cocomix.progress import progress_bar
from cocomix.tasks import (
    CHOICE_KINDS,
    EvalError,
    benchmark_ext,
    definition,
    find_format,
    read_benchmark,
    read_items,
    read_text,
    refusal,
    refused_format,
    unknown_format,
)
from cocomix.weights import write_atomic

# -----------------------------------------------------------------------------
# token streams and documents: loss, perplexity, bits per byte


@torch.no_grad()
def exp(x):
    """A perplexity from a mean loss: inf past what a float holds (a diverged model's loss), not an
    OverflowError."""
    return math.exp(x) if x < 709 else math.inf


def evaluate_tokens(
    model, tokens, block_size, batch_size, device, max_tokens=None, token_bytes=None, progress=True
):
    """Mean next-token NLL over the stream (np array or uint16 memmap), in windows of block_size+1
    tokens predicting block_size targets, the last window with a full context. Returns dict(loss,
    ppl, tokens=#targets), plus bytes and bpb when token_bytes (corpus.token_byte_lengths) is given.
    """
    if block_size > model.config.block_size:
        raise EvalError(
            f"block_size={block_size} is longer than the model's {model.config.block_size}"
        )
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise EvalError(f"need at least 2 tokens to evaluate, got {n}")
    check_tokens(tokens[:n], model.config.vocab_size, "the token stream")
    was_training = model.training  # a training loop may call this mid-run: give its mode back
    model.eval()
    # (start, targets already predicted by an earlier window): full windows, then the remainder
    windows = [(s, 0) for s in range(0, n - block_size, block_size)]
    done = len(windows) * block_size
    if done < n - 1:
        # lm-eval's rule: the short tail keeps a full context, so its first targets are not
        # predicted from nothing; its window overlaps the previous one and scores only the new
        # targets
        windows.append((n - 1 - block_size, block_size - (n - 1 - done)) if windows else (0, 0))
    total_nll, total = 0.0, 0
    for b in progress_bar(
        range(0, len(windows), batch_size), desc="tokens", disable=not progress, leave=False
    ):
        group = windows[b : b + batch_size]
        win = np.stack(
            [np.asarray(tokens[s : min(s + block_size + 1, n)], dtype=np.int64) for s, _ in group]
        )
        win = torch.from_numpy(win).to(device)
        logits, _ = model(win[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), win[:, 1:], reduction="none")
        for r, (_, skip) in enumerate(group):
            # a Python float: float64 accumulation over the stream
            total_nll += nll[r, skip:].sum().item()
            total += nll.size(1) - skip
    model.train(was_training)
    loss = total_nll / total
    out = dict(loss=loss, ppl=exp(loss), tokens=total)
    if token_bytes is not None:
        out["bytes"] = int(token_bytes[np.asarray(tokens[1:n], dtype=np.int64)].sum())
        out["bpb"] = total_nll / (math.log(2) * out["bytes"]) if out["bytes"] else float("nan")
    return out


def check_tokens(tokens, vocab_size, name):
    # an out-of-range id would otherwise surface as an opaque embedding index error
    top = int(np.max(tokens)) if len(tokens) else 0
    if top >= vocab_size:
        raise EvalError(f"{name} holds token id {top}, outside the model's vocab_size={vocab_size}")


def count_words(text):
    # lm-eval's count: leading/trailing whitespace adds an empty word
    return len(re.split(r"\s+", text))


def evaluate_text(
    model,
    path,
    enc,
    block_size,
    batch_size,
    device,
    max_tokens=None,
    token_bytes=None,
    progress=True,
):
    """A UTF-8 text file as one document: loss, ppl and bpb of all its tokens, and (when not cut by
    max_tokens) word_ppl and byte_ppl."""
    text = read_text(path)
    # EOT: the first token gets predicted too
    tokens = np.array([EOT] + enc.encode_ordinary(text), dtype=np.int64)
    if len(tokens) < 2:
        raise EvalError(f"{path} is empty")
    if token_bytes is None:
        token_bytes = token_byte_lengths(enc)
    out = evaluate_tokens(
        model, tokens, block_size, batch_size, device, max_tokens, token_bytes, progress
    )
    # the whole text: per-word and per-byte figures mean something
    if out["tokens"] == len(tokens) - 1:
        nll = out["loss"] * out["tokens"]
        out.update(
            words=count_words(text),
            word_ppl=exp(nll / count_words(text)),
            byte_ppl=exp(nll / out["bytes"]),
        )
    return out


# lm-eval's WikiText detokenizer, in its order: undo the dataset's tokenization (" @-@ " for a
# hyphen, spaces around punctuation and inside brackets and quotes) so the model sees ordinary text
WIKITEXT_RULES = [
    ("s '", "s'"),
    (
        re.compile(r"/' [0-9]/"),
        r"/'[0-9]/",
    ),  # the second matches only a literal "/' 5/": kept as lm-eval has it
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]


def wikitext_detokenize(text):
    for old, new in WIKITEXT_RULES:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def wikitext_articles(text):
    """The articles of a WikiText .raw file: a line " = Title = " (one '=' on each side, once "= ="
    of subheadings is read as "==") starts a new one, as lm-eval's wikitext_document_level."""
    articles, lines = [], []
    for line in text.split("\n"):
        head = line.replace("= = =", "===").replace("= =", "==").strip()
        if head.startswith("= ") and head.endswith(" ="):
            articles.append("\n".join(lines))
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return [a for a in articles if a.strip()]


def evaluate_documents(
    model, docs, enc, block_size, batch_size, device, token_bytes, progress=True
):
    """Rolling perplexity of WikiText articles, each scored as its own document after detokenizing;
    words and bytes counted on the original article. dict(loss, ppl, word_ppl, byte_ppl, bpb, n,
    ...)."""
    nll = tokens = words = nbytes = 0
    for doc in progress_bar(docs, desc="documents", disable=not progress, leave=False):
        ids = np.array([EOT] + enc.encode_ordinary(wikitext_detokenize(doc)), dtype=np.int64)
        r = evaluate_tokens(model, ids, block_size, batch_size, device, progress=False)
        nll += r["loss"] * r["tokens"]
        tokens += r["tokens"]
        words += count_words(doc)
        nbytes += len(doc.encode("utf-8"))
    return dict(
        loss=nll / tokens,
        ppl=exp(nll / tokens),
        word_ppl=exp(nll / words),
        byte_ppl=exp(nll / nbytes),
        bpb=nll / (math.log(2) * nbytes),
        n=len(docs),
        tokens=tokens,
        words=words,
        bytes=nbytes,
    )


# -----------------------------------------------------------------------------
# continuations: LAMBADA and multiple choice


def encode_pair(enc, context, continuation):
    """Token ids (context, continuation) of a pair of strings, tokenized together (lm-eval's rule):
    GPT-2's BPE puts a space with the word after it, so trailing whitespace of the context moves to
    the continuation; the continuation is then whatever the joint encoding holds past the context's
    own tokens, so a merge across the boundary is tokenized as in the running text."""
    if not context:
        return [], enc.encode_ordinary(continuation)  # score_continuations puts <|endoftext|> first
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx = enc.encode_ordinary(context)
    return ctx, enc.encode_ordinary(context + continuation)[len(ctx) :]


@torch.no_grad()
def score_continuations(
    model, pairs, block_size, batch_size, device, progress=True, desc="scoring", where=None
):
    """For each (context tokens, continuation tokens): (summed NLL of the continuation, whether
    greedy decoding reproduces it). Batched: sequences sorted by length, padded on the right
    (causal attention, so padding never affects the positions we read). where: per pair, the
    "file:line" its errors name."""
    was_training = model.training
    model.eval()
    check_tokens(
        np.array([t for pair in pairs for part in pair for t in part] or [0]),
        model.config.vocab_size,
        "an example",
    )
    seqs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not 0 < len(cont) <= block_size:
            raise EvalError(
                (f"{where[i]}: " if where else "")
                + f"continuation of {len(cont)} tokens does not fit block_size={block_size}"
            )
        seq = (list(ctx) or [EOT]) + list(cont)
        seqs.append(seq[-(block_size + 1) :])  # cut the context from the left
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    results = [None] * len(seqs)
    for b in progress_bar(
        range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False
    ):
        idx = order[b : b + batch_size]
        T = len(seqs[idx[0]]) - 1
        inp = torch.zeros(len(idx), T, dtype=torch.long)
        tgt = torch.full((len(idx), T), -1, dtype=torch.long)  # -1: not a continuation position
        for r, i in enumerate(idx):
            seq, n_cont = seqs[i], len(pairs[i][1])
            inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            tgt[r, len(seq) - 1 - n_cont : len(seq) - 1] = torch.tensor(seq[-n_cont:])
        inp, tgt = inp.to(device), tgt.to(device)
        logits, _ = model(inp)
        # only the continuation positions: a log-softmax over every position would cost far more
        mask = tgt >= 0
        rows = torch.arange(len(idx), device=inp.device).unsqueeze(1).expand_as(tgt)[mask]
        sel, t = logits[mask].float(), tgt[mask]
        tok_nll = -F.log_softmax(sel, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = torch.zeros(len(idx), device=inp.device).index_add_(0, rows, tok_nll)
        misses = torch.zeros(len(idx), device=inp.device).index_add_(
            0, rows, (sel.argmax(-1) != t).float()
        )
        greedy = misses == 0
        for r, i in enumerate(idx):
            results[i] = (nll[r].item(), bool(greedy[r]))
    model.train(was_training)
    return results


def evaluate_lambada(
    model, path, enc, block_size, batch_size, device, max_examples=None, progress=True
):
    """LAMBADA last-word prediction: dict(acc, ppl, nll = mean summed target NLL, n)."""
    _, items, lines = read_items(path, ("lambada",), max_examples=max_examples)
    pairs = [encode_pair(enc, *pairs[0]) for pairs, _, _ in items]
    where = [f"{path}:{line}" for line in lines]
    scores = score_continuations(
        model, pairs, block_size, batch_size, device, progress, "lambada", where
    )
    nll = sum(s[0] for s in scores) / len(scores)
    return dict(acc=sum(s[1] for s in scores) / len(scores), ppl=exp(nll), nll=nll, n=len(scores))


def evaluate_mc(
    model, path, enc, block_size, batch_size, device, max_examples=None, progress=True, sep=" "
):
    """Zero-shot multiple choice, any choice format above: dict(acc, acc_norm, n); WinoGrande has no
    acc_norm."""
    kind, items, lines = read_items(path, CHOICE_KINDS, sep, max_examples)
    pairs = [encode_pair(enc, c, x) for ps, _, _ in items for c, x in ps]
    where = [f"{path}:{line}" for (ps, _, _), line in zip(items, lines) for _ in ps]
    scores = score_continuations(
        model, pairs, block_size, batch_size, device, progress, kind, where
    )
    correct = correct_norm = start = 0
    for item_pairs, gold, lengths in items:
        ll = [-scores[start + j][0] for j in range(len(item_pairs))]
        start += len(item_pairs)
        correct += max(range(len(ll)), key=ll.__getitem__) == gold  # max keeps the first of equals
        if lengths is not None:
            norm = [l / n for l, n in zip(ll, lengths)]
            correct_norm += max(range(len(norm)), key=norm.__getitem__) == gold
    out = dict(acc=correct / len(items), acc_norm=correct_norm / len(items), n=len(items))
    if items[0][2] is None:
        del out["acc_norm"]
    return out


# -----------------------------------------------------------------------------
# a folder of benchmark files: the paper's zero-shot table

TEXT_EXTS = (".txt", ".raw", ".tokens")


def file_kind(path):
    """(what a benchmark file holds: 'lambada', 'wikitext', 'text' or one of CHOICE_KINDS, None) or
    (None, why it is not a benchmark format we know). A .gz file is its content's. A file that is
    not what its name says (a .jsonl file that is not JSON Lines of objects), unreadable or not
    UTF-8 is an EvalError: a failure, not a skip."""
    ext = benchmark_ext(path)
    if ext in TEXT_EXTS:
        first = next((line.strip() for line in read_text(path).split("\n") if line.strip()), "")
        # WikiText's files open with " = Title = "
        wiki = re.fullmatch(r"= [^=].* =", first) is not None
        return ("wikitext" if wiki else "text"), None
    if ext not in (".jsonl", ".json"):
        return None, f"not .jsonl, .json or {', '.join(TEXT_EXTS)}"
    item = first_object(path)
    if not isinstance(item, dict):
        why = "its first line is not JSON" if item is None else "not JSON Lines of objects"
        if ext == ".json":  # a JSON document (results, a config) may share a benchmark's folder
            return None, "not JSON Lines of objects"
        raise EvalError(f"{path}: {why} (JSON Lines expected)")
    if name := refused_format(item):
        return None, refusal(name)
    fmt = find_format(item)
    if fmt and fmt[1] == ("text",) and "lambada" not in os.path.basename(path).lower():
        return (
            None,
            "{\"text\"} lines, LAMBADA's format and any corpus's: "
            "read as LAMBADA only in a file named lambada*",
        )
    return (fmt[0], None) if fmt else (None, unknown_format(item))


def first_object(path):
    """The JSON value of a file's first non-blank line; None if it is not JSON."""
    first = next((line for line in read_text(path).split("\n") if line.strip()), None)
    try:
        return json.loads(first) if first is not None else None
    except ValueError:
        return None


def file_definition(path, kind):
    """What a file of this kind is scored as (tasks.definition): lm-eval's task of the paper's
    benchmark, or a variant."""
    return definition(kind, {} if benchmark_ext(path) in TEXT_EXTS else first_object(path))


def evaluate_file(
    model,
    path,
    kind,
    enc,
    block_size,
    batch_size,
    device,
    max_examples=None,
    max_tokens=None,
    sep=" ",
    token_bytes=None,
    progress=True,
):
    common = dict(block_size=block_size, batch_size=batch_size, device=device, progress=progress)
    if kind == "lambada":
        return evaluate_lambada(model, path, enc, max_examples=max_examples, **common)
    if kind in CHOICE_KINDS:
        return evaluate_mc(model, path, enc, max_examples=max_examples, sep=sep, **common)
    if kind == "text":
        return evaluate_text(
            model, path, enc, max_tokens=max_tokens, token_bytes=token_bytes, **common
        )
    if benchmark_ext(path) in TEXT_EXTS:
        docs = wikitext_articles(read_text(path))[:max_examples]
    else:
        docs = read_benchmark(path, ("wikitext",), max_examples=max_examples)[1]
    if not docs:
        raise EvalError(f"{path}: no articles")
    return evaluate_documents(model, docs, enc, token_bytes=token_bytes, **common)


def put(results, key, alt, value):
    """results[key] = value, or results[alt] when key is taken (two files of one name): never
    overwritten."""
    results[alt if key in results else key] = value


def evaluate_suite(
    model,
    folder,
    enc,
    block_size,
    batch_size,
    device,
    max_examples=None,
    max_tokens=None,
    sep=" ",
    token_bytes=None,
    progress=True,
):
    """Every benchmark file directly in `folder`, in name order: (results {"kind:file stem": dict
    with the file's name under 'file' and what it is scored as under 'definition'}, skipped
    [(name, why)], failed [(name, why)]). Sub-folders and files of no known format or of a format
    not implemented are skipped; a file that cannot be scored (a bad line, an item longer than the
    block) fails on its own, its error naming the line, and the other files are still scored."""
    if not os.path.isdir(folder):
        raise EvalError(f"--suite {folder}: not a folder")
    token_bytes = token_byte_lengths(enc) if token_bytes is None else token_bytes
    results, skipped, failed = {}, [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            skipped.append((name, "a folder"))
            continue
        try:
            kind, why = file_kind(path)
            if kind is None:
                skipped.append((name, why))
                continue
            if progress:
                print(f"{name}: {kind}", file=sys.stderr)
            r = evaluate_file(
                model,
                path,
                kind,
                enc,
                block_size,
                batch_size,
                device,
                max_examples,
                max_tokens,
                sep,
                token_bytes,
                progress,
            )
        except EvalError as e:
            failed.append((name, str(e)))
            continue
        row = dict(r, file=name, definition=file_definition(path, kind))
        stem = os.path.splitext(name.removesuffix(".gz").removesuffix(".GZ"))[0]
        put(results, f"{kind}:{stem}", f"{kind}:{name}", row)  # .raw, .jsonl, .jsonl.gz
    if not results and not failed:
        raise EvalError(f"--suite {folder}: no benchmark file found ({len(skipped)} other entries)")
    return results, skipped, failed


# -----------------------------------------------------------------------------
# command line


def markdown_table(results, skipped=(), failed=()):
    """One Markdown table of every result (n: examples, documents or predicted tokens; scored as:
    lm-eval's task of the paper's benchmark, or a variant), then the files that failed and those
    skipped."""
    cols = ["n", "acc", "acc_norm", "ppl", "word_ppl", "bpb", "loss"]
    scored_as = any("definition" in r for r in results.values())
    head = ["task", *cols] + (["scored as"] if scored_as else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, r in results.items():
        cells = []
        for c in cols:
            v = r.get("n", r.get("tokens")) if c == "n" else r.get(c)
            cells.append("–" if v is None else f"{v:d}" if isinstance(v, int) else f"{v:.4f}")
        if scored_as:
            cells.append(r.get("definition", "–").replace("|", "/"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{n} ({why})" for n, why in failed)]
    if skipped:
        lines += ["", "Not evaluated: " + "; ".join(f"{n} ({why})" for n, why in skipped)]
    return "\n".join(lines) + "\n"


def write_results(path, record, table):
    """JSON at path, the Markdown table next to it (same name, .md), each through a renamed
    temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for p, text in (
        (path, json.dumps(record, indent=2) + "\n"),
        (os.path.splitext(path)[0] + ".md", table),
    ):
        write_atomic(p, text)
