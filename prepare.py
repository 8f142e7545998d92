"""
Turn text into nanoGPT-style token files with tiktoken's GPT-2 encoding.

    python prepare.py --input $COCOMIX_DATA/gutenberg --out_dir data/gutenberg
    python prepare.py --source shakespeare --out_dir data/shakespeare

out_dir gets train.bin and val.bin (raw np.uint16 token ids: np.memmap(path, dtype=np.uint16,
mode="r")) and meta.json (tokenizer, vocab size, eot token, tokens and documents per split, input
files with sizes and sha256, the split rule). meta.json is written last: it marks a finished run.

Documents: each input file is one document (folders: all *.txt inside, recursively, sorted).
With --doc_separator (automatic for --source tinystories) files are cut into documents at that
string and each piece is stripped. Empty documents are skipped. Each document is encoded with
encode_ordinary ("<|endoftext|>" in the text stays plain text) and followed by exactly one
<|endoftext|> (50256), so a corpus has sum over documents of (len(tokens) + 1) tokens.

Train/val split, deterministic (same inputs and settings give identical bytes):
- 20 or more documents: whole documents go to one side. A document goes to val when the first
  8 bytes of sha256(its UTF-8 text), as a big-endian integer divided by 2**64, are below
  val_fraction; if none does, the one with the smallest hash does. So identical documents land on
  the same side, and adding files never moves other files.
- fewer than 20: the documents are concatenated in input order and the last
  max(ceil(val_fraction * tokens), 1025) tokens go to val (1025 = one 1024-token block plus its
  shifted target), capped at half of the tokens. With one document (shakespeare) val is its tail.
Default val_fraction 0.01: about 2 books (~100k tokens) of a 200-book corpus, enough for a stable
loss estimate while 99% of the text trains.
- --source openwebtext: nanoGPT's split, so that the validation set is nanoGPT's and the released
  code's: datasets' train_test_split(test_size=0.0005, seed=2357, shuffle=True) of the Hugging Face
  dataset, its 'test' part as val, each part in the order that split gives.
"""

import argparse
import collections
import hashlib
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cocomix.interrupt import on_ctrl_c

if __name__ == "__main__":  # Ctrl-C in the start-up (the imports below): one line, exit 130
    on_ctrl_c("temporary files removed; a data folder without meta.json is unfinished")

import numpy as np

import cocomix.weights as weights
from cocomix.corpus import EOT as EOT_TOKEN
from cocomix.corpus import VOCAB_SIZE, token_file_digest, tokenizer
from cocomix.progress import progress_bar
from cocomix.sources import OPENWEBTEXT_SPLIT, SOURCES, fetch_source, openwebtext

TOKENIZER = "gpt2"
VAL_FRACTION = 0.01
MIN_DOCS_FOR_DOC_SPLIT = 20
MIN_VAL_TOKENS = 1025
CHUNK_CHARS = 1 << 18  # long documents are encoded in pieces of about this size, in parallel
FORMAT_VERSION = 1


class PrepareError(Exception):
    """An expected failure (bad input, occupied out_dir, offline): main prints it as one line."""


def get_encoding():
    """corpus.tokenizer(), checked to fit what prepare.py writes."""
    try:
        enc = tokenizer()
    except (
        RuntimeError
    ) as e:  # offline without TIKTOKEN_CACHE_DIR: one line from main, like every other failure
        raise PrepareError(str(e)) from None
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT_TOKEN
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"
    return enc


# -----------------------------------------------------------------------------
# reading inputs


def find_input_files(inputs):
    """Files as given, folders searched recursively for *.txt (sorted, so the order is stable)."""
    paths = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise PrepareError(f"no .txt files found in folder {p}")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise PrepareError(f"input not found: {p}")
    seen = set()  # the same file named twice would otherwise be two documents
    paths = [p for p in paths if not (p.resolve() in seen or seen.add(p.resolve()))]
    if not paths:
        raise PrepareError("no input files found")
    return paths


def decode_utf8(data, path):
    try:
        return data.decode("utf-8-sig")  # a leading BOM dropped, as Python's utf-8-sig reads it
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def split_documents(text, doc_separator=None):
    if doc_separator is None:
        return [text] if text.strip() else []
    return [d.strip() for d in text.split(doc_separator) if d.strip()]


def scan_files(paths, doc_separator=None):
    """Size, sha256, UTF-8 check and document count of every file, before any output is touched."""
    infos = []
    for path in paths:
        data = path.read_bytes()
        docs = split_documents(decode_utf8(data, path), doc_separator)
        infos.append(
            dict(
                path=str(path),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                documents=len(docs),
                chars=sum(len(d) for d in docs),
            )
        )
    empty = [i["path"] for i in infos if i["documents"] == 0]
    if len(empty) == len(infos):
        raise PrepareError(
            f"no text: all {len(infos)} input file(s) are empty or whitespace "
            f"({', '.join(empty[:3])})"
        )
    for path in empty:
        print(f"warning: skipping empty file {path}", file=sys.stderr)
    return infos


def read_documents(paths, doc_separator=None):
    """Yields the documents of the given files (str), in order, skipping empty ones."""
    for path in paths:
        yield from split_documents(decode_utf8(Path(path).read_bytes(), path), doc_separator)


# -----------------------------------------------------------------------------
# encoding

# A cut just after a newline that follows a non-space and precedes an ASCII letter is a boundary of
# GPT-2's pre-tokenizer regex, so encoding the pieces separately gives exactly the same tokens.
SAFE_CUT = re.compile(r"\S\n(?=[A-Za-z])")


def chunk_text(text, size=CHUNK_CHARS):
    pieces, start = [], 0
    while len(text) - start > size:
        m = SAFE_CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def hash_fraction(doc):
    """A stable number in [0, 1) from the document's content: decides its side of the split."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64


def encode_documents(docs, num_proc, progress):
    """Yields (uint16 tokens ending in EOT, hash fraction, or the side of a (text, side) document)
    per document, in order, encoding
    pieces on num_proc threads (tiktoken releases the GIL) with a bounded number in flight."""
    enc = get_encoding()
    pending, in_flight = collections.deque(), 0

    def finish(futures):
        tokens = []
        for fut, nchars in futures:
            tokens.extend(fut.result())
            progress.update(nchars)
        tokens.append(EOT_TOKEN)
        return np.array(tokens, dtype=np.uint16)

    with ThreadPoolExecutor(num_proc) as pool:
        for doc in docs:
            # (text, 'train' or 'val'): a split the source made; it then stands for the hash
            doc, side = doc if isinstance(doc, tuple) else (doc, hash_fraction(doc))
            futures = [(pool.submit(enc.encode_ordinary, c), len(c)) for c in chunk_text(doc)]
            pending.append((futures, side))
            in_flight += len(futures)
            while in_flight > 4 * num_proc:
                futures, frac = pending.popleft()
                in_flight -= len(futures)
                yield finish(futures), frac
        while pending:
            futures, frac = pending.popleft()
            yield finish(futures), frac


# -----------------------------------------------------------------------------
# splitting


def split_rule(mode):
    if mode == "source":
        return (
            "the source's own split: Hugging Face datasets' train_test_split("
            + ", ".join(f"{k}={v}" for k, v in OPENWEBTEXT_SPLIT.items())
            + ") of Skylion007/openwebtext's train split, its 'test' part as val (nanoGPT's "
            "openwebtext/prepare.py, which the released code uses); each part in that order"
        )
    if mode == "documents":
        return (
            "whole documents: a document goes to val if int.from_bytes(sha256(document "
            "UTF-8)[:8], 'big') / 2**64 < val_fraction; if none does, the document with the "
            f"smallest hash goes to val (used when there are >= {MIN_DOCS_FOR_DOC_SPLIT} documents)"
        )
    return (
        "token tail: documents are concatenated in input order, each followed by <|endoftext|>, "
        f"and the last max(ceil(val_fraction * tokens), {MIN_VAL_TOKENS}) tokens, capped at half "
        f"of the tokens, go to val (used when there are < {MIN_DOCS_FOR_DOC_SPLIT} documents)"
    )


def plan_split(doc_lens, doc_fracs, val_fraction):
    """Returns (mode, ranges, documents): ranges are (start, end, 'train' or 'val') over the token
    stream of all documents in order; documents counts those with any token in each split."""
    ends = np.cumsum(doc_lens)
    starts, total = ends - np.asarray(doc_lens), int(ends[-1])
    if isinstance(doc_fracs[0], str):  # each document's side, as the source split them
        ranges = [(int(a), int(b), side) for a, b, side in zip(starts, ends, doc_fracs)]
        return "source", ranges, {s: doc_fracs.count(s) for s in ("train", "val")}
    if len(doc_lens) >= MIN_DOCS_FOR_DOC_SPLIT:
        is_val = np.asarray(doc_fracs) < val_fraction
        if not is_val.any():
            is_val[np.argmin(doc_fracs)] = True
        if is_val.all():  # only possible with a huge val_fraction; train must not be empty either
            is_val[np.argmax(doc_fracs)] = False
        ranges = [
            (int(a), int(b), "val" if v else "train") for a, b, v in zip(starts, ends, is_val)
        ]
        return "documents", ranges, {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    cut = total - min(max(math.ceil(val_fraction * total), MIN_VAL_TOKENS), total // 2)
    counts = {
        "train": int((starts < cut).sum()),
        "val": int((ends > cut).sum()),
    }  # the cut doc counts twice
    return "tokens", [(0, cut, "train"), (cut, total, "val")], counts


# -----------------------------------------------------------------------------
# output folder


def load_meta(out_dir):
    """The meta.json of a finished run; PrepareError if there is none."""
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"no finished prepare.py output in {out_dir} ({e})") from None


def check_out_dir(out, settings, input_ids, overwrite):
    """True if out already holds this exact corpus; PrepareError if it holds another one."""
    if not (out / "meta.json").exists():
        if ((out / "train.bin").exists() or (out / "val.bin").exists()) and not overwrite:
            raise PrepareError(
                f"{out} holds train.bin/val.bin but no meta.json (another tool or an unfinished "
                "run); use another --out_dir or --overwrite"
            )
        return False
    try:
        meta = load_meta(out)
        same = meta["settings"] == settings and [i["sha256"] for i in meta["inputs"]] == input_ids
    except (PrepareError, KeyError, TypeError):
        same = False
    if not same and not overwrite:
        raise PrepareError(
            f"{out} already holds a different corpus (other inputs or settings); "
            "use another --out_dir or --overwrite"
        )
    # the same corpus is done, unless its bins are missing or damaged: then they are ours to redo
    return same and all(
        (out / f"{s}.bin").is_file()
        and (out / f"{s}.bin").stat().st_size == 2 * meta["splits"][s]["tokens"]
        for s in ("train", "val")
    )


TMP_NAME = re.compile(r"\.(stream|train|val|meta)\.tmp-(\d+)")  # write_corpus's temporary files


def pid_alive(pid):
    """Whether a process of this number runs on this machine (signal 0 checks without sending
    anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_tmp(out):
    """Temporary files of runs that were killed (kill -9 skips write_corpus's clean-up): the token
    stream alone is the size of the corpus. Those of a live process are another run's, still
    working."""
    for f in out.iterdir():
        if (m := TMP_NAME.fullmatch(f.name)) and not pid_alive(int(m.group(2))):
            f.unlink(missing_ok=True)


def write_corpus(
    docs, inputs, settings, out_dir, num_proc, total_chars=None, overwrite=False, verbose=True
):
    """Encodes docs into out_dir/{train,val}.bin + meta.json. Everything goes to temporary files in
    out_dir first and is moved into place at the end, meta.json last; on any error they are removed
    (a full disk is a PrepareError)."""
    from cocomix.runtime import hold_lock

    try:  # two runs on one folder would replace each other's files
        release = hold_lock(os.path.join(out_dir, "lock"))
    except RuntimeError as e:
        raise PrepareError(str(e)) from None
    try:
        return _write_corpus(
            docs, inputs, settings, out_dir, num_proc, total_chars, overwrite, verbose
        )
    finally:
        release()


def _write_corpus(
    docs, inputs, settings, out_dir, num_proc, total_chars=None, overwrite=False, verbose=True
):
    """write_corpus under the folder's lock."""
    out = Path(out_dir)
    if num_proc < 1:
        raise PrepareError(f"--num_proc must be >= 1, got {num_proc}")
    if check_out_dir(out, settings, [i["sha256"] for i in inputs], overwrite):
        if verbose:
            print(f"already prepared: {out} holds this corpus with these settings")
        return load_meta(out)
    created = not out.exists()
    tmp = {name: out / f".{name}.tmp-{os.getpid()}" for name in ("stream", "train", "val", "meta")}
    t0 = time.time()
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        # 1) encode every document, in order, into one token stream
        doc_lens, doc_fracs = [], []
        with (
            open(tmp["stream"], "wb") as f,
            progress_bar(
                total=total_chars,
                unit="char",
                unit_scale=True,
                desc="encoding",
                disable=not verbose,
            ) as progress,
        ):
            for tokens, frac in encode_documents(docs, num_proc, progress):
                tokens.tofile(f)
                doc_lens.append(len(tokens))
                doc_fracs.append(frac)
        if not doc_lens:
            raise PrepareError("no text: every document is empty or whitespace")
        # 2) cut the stream into train and val
        mode, ranges, n_docs = plan_split(doc_lens, doc_fracs, settings["val_fraction"])
        n_tokens = cut_stream(tmp, ranges)
        meta = corpus_meta(tmp, mode, n_tokens, n_docs, doc_lens, settings, inputs)
        with open(tmp["meta"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # 3) move into place; an old meta.json goes first so a crash never pairs it with new bins
        move_into_place(tmp, out)
    except OSError as e:  # a full disk, a read-only folder
        raise PrepareError(
            f"cannot write in {out} ({e.strerror or e}; {weights.free_bytes(tmp['stream']):,} "
            "bytes free there); its temporary files are removed"
        ) from None
    finally:
        for path in tmp.values():
            if path.exists():
                path.unlink()
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
    if verbose:
        s = meta["splits"]
        print(
            f"train: {s['train']['tokens']:,} tokens ({s['train']['documents']} docs), "
            f"val: {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), split by {mode}, "
            f"{time.time() - t0:.1f}s -> {out}"
        )
    return meta


def cut_stream(tmp, ranges):
    """Copies the ranges of the token stream (plan_split's) to the train and val files, in order;
    returns the tokens on each side."""
    stream = np.memmap(tmp["stream"], dtype=np.uint16, mode="r")  # on disk, not in memory
    n_tokens = {"train": 0, "val": 0}
    with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
        for a, b, side in ranges:
            stream[a:b].tofile(ftrain if side == "train" else fval)
            n_tokens[side] += b - a
    del stream
    return n_tokens


def corpus_meta(tmp, mode, n_tokens, n_docs, doc_lens, settings, inputs):
    """meta.json's content for the token files just written to tmp (module docstring)."""
    return {
        "format": "nanoGPT: raw np.uint16 token ids, every document followed by eot_token",
        "tokenizer": TOKENIZER,
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_TOKEN,
        "dtype": "uint16",
        "splits": {s: {"tokens": n_tokens[s], "documents": n_docs[s]} for s in ("train", "val")},
        "total_tokens": int(sum(doc_lens)),
        "total_documents": len(doc_lens),
        "split": {
            "mode": mode,
            "rule": split_rule(mode),
            "val_fraction": settings["val_fraction"],
            "min_docs_for_document_split": MIN_DOCS_FOR_DOC_SPLIT,
            "min_val_tokens": MIN_VAL_TOKENS,
        },
        "settings": settings,
        "inputs": [{k: v for k, v in i.items() if k != "chars"} for i in inputs],
        # checked by every reader (cocomix/corpus.py): a file replaced in place is refused
        "digests": {f"{s}.bin": token_file_digest(tmp[s]) for s in ("train", "val")},
    }


def move_into_place(tmp, out):
    """The finished files from their temporary names to out, meta.json last (it marks a finished
    run)."""
    if (out / "meta.json").exists():
        os.remove(out / "meta.json")
    os.replace(tmp["train"], out / "train.bin")
    os.replace(tmp["val"], out / "val.bin")
    os.replace(tmp["meta"], out / "meta.json")


def make_settings(val_fraction, doc_separator):
    if not 0 < val_fraction <= 0.5:
        raise PrepareError(f"--val_fraction must be in (0, 0.5], got {val_fraction}")
    if doc_separator == "":
        raise PrepareError(
            "--doc_separator must not be empty (leave it out: one file, one document)"
        )
    return {
        "tokenizer": TOKENIZER,
        "val_fraction": val_fraction,
        "doc_separator": doc_separator,
        "min_docs_for_document_split": MIN_DOCS_FOR_DOC_SPLIT,
        "min_val_tokens": MIN_VAL_TOKENS,
        "format_version": FORMAT_VERSION,
    }


def prepare(
    inputs,
    out_dir,
    val_fraction=VAL_FRACTION,
    num_proc=None,
    overwrite=False,
    doc_separator=None,
    verbose=True,
):
    """Prepares local text files/folders into out_dir; returns the meta dict (module docstring)."""
    settings = make_settings(val_fraction, doc_separator)
    paths = find_input_files([inputs] if isinstance(inputs, (str, Path)) else inputs)
    infos = scan_files(paths, doc_separator)
    return write_corpus(
        read_documents(paths, doc_separator),
        infos,
        settings,
        out_dir,
        num_proc or os.cpu_count() or 1,
        sum(i["chars"] for i in infos),
        overwrite,
        verbose,
    )


# -----------------------------------------------------------------------------
# named sources (cocomix/sources.py: downloads, OpenWebText's split)


def prepare_source(
    name,
    out_dir,
    cache_dir=weights.CACHE_DIR,
    val_fraction=VAL_FRACTION,
    num_proc=None,
    overwrite=False,
    verbose=True,
):
    num_proc = num_proc or os.cpu_count() or 1
    try:
        if name != "openwebtext":
            path, doc_separator = fetch_source(name, cache_dir)
        else:
            docs, inputs = openwebtext(cache_dir, num_proc)
    except RuntimeError as e:  # offline, or without the datasets package
        raise PrepareError(str(e)) from None
    if name != "openwebtext":
        return prepare([path], out_dir, val_fraction, num_proc, overwrite, doc_separator, verbose)
    settings = dict(make_settings(OPENWEBTEXT_SPLIT["test_size"], None), split=OPENWEBTEXT_SPLIT)
    return write_corpus(
        docs,
        inputs,
        settings,
        out_dir,
        num_proc,
        overwrite=overwrite,
        verbose=verbose,
    )


# -----------------------------------------------------------------------------


def arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input", nargs="+", metavar="PATH", help="text files and/or folders of *.txt files"
    )
    what.add_argument(
        "--source", choices=sorted(SOURCES), help="a named source, downloaded to --cache_dir"
    )
    parser.add_argument("--out_dir", required=True, help="folder for train.bin, val.bin, meta.json")
    parser.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help=f"default {VAL_FRACTION}; --source openwebtext has nanoGPT's split instead",
    )
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="encoding threads")
    parser.add_argument(
        "--doc_separator", default=None, help="cut files into documents at this string"
    )
    parser.add_argument(
        "--cache_dir", default=weights.CACHE_DIR, help="where named sources are downloaded"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different corpus in --out_dir"
    )
    return parser


def main(argv=None):
    parser = arg_parser()
    args = parser.parse_args(argv)
    if args.source == "openwebtext" and args.val_fraction is not None:
        parser.error(
            "--source openwebtext is split as nanoGPT splits it: --val_fraction does not apply"
        )
    args.val_fraction = VAL_FRACTION if args.val_fraction is None else args.val_fraction
    # a named source comes with its own documents
    if args.source and args.doc_separator is not None:
        parser.error(
            "--doc_separator applies to --input files; a named --source is split its own way"
        )
    try:
        if args.source:
            prepare_source(
                args.source,
                args.out_dir,
                args.cache_dir,
                args.val_fraction,
                args.num_proc,
                args.overwrite,
            )
        else:
            prepare(
                args.input,
                args.out_dir,
                args.val_fraction,
                args.num_proc,
                args.overwrite,
                args.doc_separator,
            )
    except (PrepareError, OSError) as e:  # OSError: an input that cannot be read
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
