"""
Evaluate any checkpoint on its own: held-out loss / perplexity / bits per byte, LAMBADA, and
zero-shot multiple choice.

    python eval.py --ckpt=out/x/ckpt.pt --data_dir=data/gutenberg --split=val
    python eval.py --ckpt=out/x/ckpt.pt --text a.txt b.txt --lambada=lambada_test.jsonl
    python eval.py --init_from=/path/to/gpt2 --mc=piqa.jsonl --json_out=results.json

Conventions (all deterministic: no sampling, no shuffling):
- Token streams are cut into windows of block_size+1 tokens that share one token with the next,
  so every token after the first is predicted exactly once, with the previous window's context
  thrown away (no sliding). The last, shorter window counts too. loss = mean NLL in nats.
- bpb = loss * n_targets / (ln 2 * n_bytes), where n_bytes is the UTF-8 length of the predicted
  tokens' text. <|endoftext|> (50256) is predicted and its loss counted, but it is a separator,
  not text, so it contributes 0 bytes. A --text file is evaluated as <|endoftext|> + its tokens
  (encode_ordinary), so every token of the file is predicted and n_bytes = len(text.encode()).
- LAMBADA (OpenAI's jsonl, as lm-eval-harness's lambada_openai): context = text up to the last
  space, target = " " + last word, tokenized separately. acc: greedy decoding reproduces the whole
  target (argmax equals the target token at every target position). ppl = exp(mean over examples
  of the target's summed NLL), lm-eval-harness's perplexity.
- Multiple choice ({"query", "choices", "gold"} per line): a choice is scored by the summed
  log-likelihood of its tokens after the query's (query and choice tokenized separately and
  concatenated, so put the separating space in the choice, e.g. " Paris"). acc: argmax of the
  sum. acc_norm: argmax of the sum divided by the choice's length in characters, which is what
  lm-eval-harness's code does (len(choice), often described as byte length; equal for ASCII).
- Contexts longer than the model's window are cut from the left. An empty context becomes
  <|endoftext|>. Ties go to the first choice.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from corpus import EOT, load_tokens, token_byte_lengths, tokenizer
from model import GPT, load_checkpoint


class EvalError(Exception):
    """An expected failure (bad input file, wrong data): main prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# token streams: loss, perplexity, bits per byte


@torch.no_grad()
def evaluate_tokens(model, tokens, block_size, batch_size, device, max_tokens=None, token_bytes=None, progress=True):
    """Mean next-token NLL over the stream (np array or uint16 memmap), in windows of block_size+1
    tokens predicting block_size targets. Returns dict(loss, ppl, tokens=#targets), plus bytes and
    bpb when token_bytes (corpus.token_byte_lengths) is given."""
    if block_size > model.config.block_size:
        raise EvalError(f"block_size={block_size} is longer than the model's {model.config.block_size}")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise EvalError(f"need at least 2 tokens to evaluate, got {n}")
    check_tokens(tokens[:n], model.config.vocab_size, "the token stream")
    was_training = model.training  # a training loop may call this mid-run: give its mode back
    model.eval()
    # full windows go in batches; the one short window at the end (if any) is run on its own
    full = list(range(0, n - block_size, block_size))
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if (n - 1) % block_size:
        groups.append([len(full) * block_size])
    total_nll, total = 0.0, 0
    for group in tqdm(groups, desc="tokens", disable=not progress, leave=False):
        win = np.stack([np.asarray(tokens[s:min(s + block_size + 1, n)], dtype=np.int64) for s in group])
        win = torch.from_numpy(win).to(device)
        logits, _ = model(win[:, :-1])
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), win[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()  # a Python float: float64 accumulation over the whole stream
        total += win[:, 1:].numel()
    model.train(was_training)
    loss = total_nll / total
    out = dict(loss=loss, ppl=math.exp(loss), tokens=total)
    if token_bytes is not None:
        out["bytes"] = int(token_bytes[np.asarray(tokens[1:n], dtype=np.int64)].sum())
        out["bpb"] = total_nll / (math.log(2) * out["bytes"]) if out["bytes"] else float("nan")
    return out


def check_tokens(tokens, vocab_size, name):
    # an out-of-range id would otherwise surface as an opaque embedding index error
    top = int(np.max(tokens)) if len(tokens) else 0
    if top >= vocab_size:
        raise EvalError(f"{name} holds token id {top}, outside the model's vocab_size={vocab_size}")


def evaluate_text(model, path, enc, block_size, batch_size, device, max_tokens=None, token_bytes=None, progress=True):
    """A UTF-8 text file as one document: loss, ppl and bpb of all its tokens."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    tokens = np.array([EOT] + enc.encode_ordinary(text), dtype=np.int64)  # EOT: the first token gets predicted too
    if len(tokens) < 2:
        raise EvalError(f"{path} is empty")
    if token_bytes is None:
        token_bytes = token_byte_lengths(enc)
    return evaluate_tokens(model, tokens, block_size, batch_size, device, max_tokens, token_bytes, progress)

# -----------------------------------------------------------------------------
# continuations: LAMBADA and multiple choice


@torch.no_grad()
def score_continuations(model, pairs, block_size, batch_size, device, progress=True, desc="scoring"):
    """For each (context tokens, continuation tokens): (summed NLL of the continuation, whether
    greedy decoding reproduces it). Batched: sequences sorted by length, padded on the right
    (causal attention, so padding never affects the positions we read)."""
    was_training = model.training
    model.eval()
    check_tokens(np.array([t for pair in pairs for part in pair for t in part] or [0]), model.config.vocab_size, "an example")
    seqs = []
    for ctx, cont in pairs:
        if not 0 < len(cont) <= block_size:
            raise EvalError(f"continuation of {len(cont)} tokens does not fit block_size={block_size}")
        seq = (list(ctx) or [EOT]) + list(cont)
        seqs.append(seq[-(block_size + 1):])  # cut the context from the left
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    results = [None] * len(seqs)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[b:b + batch_size]
        T = len(seqs[idx[0]]) - 1
        inp = torch.zeros(len(idx), T, dtype=torch.long)
        tgt = torch.full((len(idx), T), -1, dtype=torch.long)  # -1: not a continuation position
        for r, i in enumerate(idx):
            seq, n_cont = seqs[i], len(pairs[i][1])
            inp[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            tgt[r, len(seq) - 1 - n_cont:len(seq) - 1] = torch.tensor(seq[-n_cont:])
        inp, tgt = inp.to(device), tgt.to(device)
        logits, _ = model(inp)
        # only the continuation positions: a log-softmax over every position would cost far more
        mask = tgt >= 0
        rows = torch.arange(len(idx), device=inp.device).unsqueeze(1).expand_as(tgt)[mask]
        sel, t = logits[mask].float(), tgt[mask]
        tok_nll = -F.log_softmax(sel, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
        nll = torch.zeros(len(idx), device=inp.device).index_add_(0, rows, tok_nll)
        misses = torch.zeros(len(idx), device=inp.device).index_add_(0, rows, (sel.argmax(-1) != t).float())
        greedy = misses == 0
        for r, i in enumerate(idx):
            results[i] = (nll[r].item(), bool(greedy[r]))
    model.train(was_training)
    return results


def read_jsonl(path, keys, max_examples=None):
    """The objects of a JSONL file (blank lines skipped); errors name the file and line."""
    items = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}:{lineno}: malformed JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(item, dict):
                raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            missing = [k for k in keys if k not in item]
            if missing:
                raise EvalError(f"{path}:{lineno}: missing key(s) {', '.join(map(repr, missing))}")
            items.append((lineno, item))
            if max_examples is not None and len(items) >= max_examples:
                break
    if not items:
        raise EvalError(f"{path}: no examples")
    return items


def evaluate_lambada(model, path, enc, block_size, batch_size, device, max_examples=None, progress=True):
    """LAMBADA last-word prediction: dict(acc, ppl, nll = mean summed target NLL, n)."""
    pairs = []
    for lineno, item in read_jsonl(path, ["text"], max_examples):
        text = item["text"]
        if not isinstance(text, str) or " " not in text:
            raise EvalError(f"{path}:{lineno}: 'text' must be a string with a space before its last word")
        context, word = text.rsplit(" ", 1)  # as lm-eval-harness: no stripping
        pairs.append((enc.encode_ordinary(context), enc.encode_ordinary(" " + word)))
    scores = score_continuations(model, pairs, block_size, batch_size, device, progress, "lambada")
    nll = sum(s[0] for s in scores) / len(scores)
    return dict(acc=sum(s[1] for s in scores) / len(scores), ppl=math.exp(nll), nll=nll, n=len(scores))


def evaluate_mc(model, path, enc, block_size, batch_size, device, max_examples=None, progress=True):
    """Zero-shot multiple choice: dict(acc, acc_norm, n)."""
    items = read_jsonl(path, ["query", "choices", "gold"], max_examples)
    pairs, spans = [], []
    for lineno, item in items:
        q, choices, gold = item["query"], item["choices"], item["gold"]
        if not isinstance(q, str) or not isinstance(choices, list) or not choices or \
                not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"{path}:{lineno}: 'query' must be a string and 'choices' a list of non-empty strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise EvalError(f"{path}:{lineno}: gold={gold!r} is not an index into its {len(choices)} choices")
        q_tokens = enc.encode_ordinary(q)
        spans.append((len(pairs), choices, gold))
        pairs.extend((q_tokens, enc.encode_ordinary(c)) for c in choices)
    scores = score_continuations(model, pairs, block_size, batch_size, device, progress, "choices")
    correct = correct_norm = 0
    for start, choices, gold in spans:
        ll = [-scores[start + j][0] for j in range(len(choices))]
        norm = [l / len(c) for l, c in zip(ll, choices)]
        correct += max(range(len(ll)), key=ll.__getitem__) == gold  # max keeps the first of equals
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == gold
    return dict(acc=correct / len(spans), acc_norm=correct_norm / len(spans), n=len(spans))

# -----------------------------------------------------------------------------
# command line


def print_table(results):
    cols = ["n", "loss", "ppl", "bpb", "acc", "acc_norm"]
    print(f"{'task':<28}" + "".join(f"{c:>12}" for c in cols))
    for name, r in results.items():
        cells = []
        for c in cols:
            v = r.get("tokens", r.get("n")) if c == "n" else r.get(c)
            cells.append("-" if v is None else f"{v:d}" if isinstance(v, int) else f"{v:.4f}")
        print(f"{name[:27]:<28}" + "".join(f"{c:>12}" for c in cells))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint (see the top of eval.py for the conventions).")
    p.add_argument("--ckpt", help="a checkpoint saved by train.py")
    p.add_argument("--init_from", help="a local Hugging Face GPT-2 folder instead of --ckpt")
    p.add_argument("--data_dir", help="a prepare.py output folder (train.bin, val.bin, meta.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="UTF-8 text files, each one document")
    p.add_argument("--lambada", help="OpenAI's lambada_test.jsonl")
    p.add_argument("--mc", nargs="+", default=[], metavar="PATH", help='JSONL of {"query", "choices", "gold"}')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast on cuda")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=0, help="context length (default: the model's)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of each stream")
    p.add_argument("--max_examples", type=int, default=None, help="only the first N LAMBADA / multiple-choice examples")
    p.add_argument("--json_out", help="also write the results here as JSON")
    args = p.parse_args(argv)

    try:
        if bool(args.ckpt) == bool(args.init_from):
            raise EvalError("give exactly one of --ckpt or --init_from")
        if not (args.data_dir or args.text or args.lambada or args.mc):
            raise EvalError("nothing to evaluate: give --data_dir, --text, --lambada and/or --mc")
        for k in ("batch_size", "max_tokens", "max_examples"):
            if getattr(args, k) is not None and getattr(args, k) < 1:
                raise EvalError(f"--{k} must be at least 1")
        info = {}
        try:
            if args.ckpt:
                model, ckpt = load_checkpoint(args.ckpt, args.device)
                info = {k: ckpt[k] for k in ("iter_num", "model_args") if k in ckpt}
                if "best_val_loss" in ckpt:
                    info["best_val_loss"] = float(ckpt["best_val_loss"])
            else:
                model = GPT.from_pretrained(args.init_from).to(args.device)
        except FileNotFoundError as e:
            raise EvalError(f"checkpoint not found: {e.filename or args.ckpt or args.init_from}") from None
        except ValueError as e:
            raise EvalError(str(e)) from None
        model.eval()
        block_size = args.block_size or model.config.block_size
        device_type = "cuda" if str(args.device).startswith("cuda") else "cpu"
        ctx = torch.autocast(device_type, dtype=getattr(torch, args.dtype),
                             enabled=device_type == "cuda" and args.dtype != "float32")
        try:  # corpus raises these with one-line messages: ours to print
            enc = tokenizer()
            tokens = load_tokens(args.data_dir, args.split) if args.data_dir else None
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise EvalError(str(e)) from None
        token_bytes = token_byte_lengths(enc)
        common = dict(block_size=block_size, batch_size=args.batch_size, device=args.device)
        results = {}
        with ctx:
            if tokens is not None:
                results[f"{args.split}"] = evaluate_tokens(model, tokens, max_tokens=args.max_tokens,
                                                           token_bytes=token_bytes, **common)
            for path in args.text:
                results[f"text:{os.path.basename(path)}"] = evaluate_text(
                    model, path, enc, max_tokens=args.max_tokens, token_bytes=token_bytes, **common)
            if args.lambada:
                results["lambada"] = evaluate_lambada(model, args.lambada, enc, max_examples=args.max_examples, **common)
            for path in args.mc:
                name = os.path.splitext(os.path.basename(path))[0]
                results[f"mc:{name}"] = evaluate_mc(model, path, enc, max_examples=args.max_examples, **common)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    print_table(results)
    if args.json_out:
        out = dict(ckpt=args.ckpt, init_from=args.init_from, block_size=block_size, **info, results=results)
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return results


if __name__ == "__main__":
    main()
