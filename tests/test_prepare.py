"""Tests for prepare.py: token layout, the split rule, determinism, errors, caching, offline
sources."""

import hashlib
import json
import os
import random
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare as P
from cocomix import sources

REPO = Path(__file__).parent.parent
DATA = Path(os.environ.get("COCOMIX_DATA", "/nonexistent"))  # the data folder, as .ci/run sets it

enc = tiktoken.get_encoding("gpt2")
EOT = 50256


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(out, split):
    return np.fromfile(out / f"{split}.bin", dtype=np.uint16)


def pieces(tokens):
    """Cuts a token stream after every EOT: one piece per document, EOT included."""
    ends = np.flatnonzero(tokens == EOT) + 1
    assert len(tokens) == 0 or ends[-1] == len(tokens), "stream must end with EOT"
    return [tuple(p) for p in np.split(tokens, ends[:-1])] if len(tokens) else []


def doc_tokens(text):
    return tuple(enc.encode_ordinary(text) + [EOT])


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def cli(*args):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


MANY = [
    f"Story {i}: the {'quick ' * (i % 5)}fox number {i} jumped.\nThe end of {i}.\n"
    for i in range(40)
]

# -----------------------------------------------------------------------------
# token layout and split rule


def test_token_count_rule_and_roundtrip(tmp_path):
    texts = [
        "Hello world.\n\nSecond paragraph, ünïcödé ✓.\n",
        "A document that mentions <|endoftext|> as plain text.",
        "  leading spaces and trailing newlines\n\n\n",
    ]
    for i, t in enumerate(texts):
        write(tmp_path / "in" / f"{i}.txt", t)
    meta = P.prepare([tmp_path / "in"], tmp_path / "out", verbose=False)
    train, val = load(tmp_path / "out", "train"), load(tmp_path / "out", "val")
    stream = np.concatenate([train, val])
    expected = [doc_tokens(t) for t in texts]
    assert (
        len(stream) == sum(len(enc.encode_ordinary(t)) + 1 for t in texts) == meta["total_tokens"]
    )
    assert pieces(stream) == expected  # every document ends in exactly one EOT, in input order
    assert enc.decode([int(x) for x in stream]) == "<|endoftext|>".join(texts) + "<|endoftext|>"
    # few documents: val is the tail of the stream, at least one block or half of a tiny corpus
    assert meta["split"]["mode"] == "tokens"
    assert len(val) == min(
        max(int(np.ceil(0.01 * len(stream))), P.MIN_VAL_TOKENS), len(stream) // 2
    )
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["splits"]["val"][
        "tokens"
    ] == len(val)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert [i["sha256"] for i in meta["inputs"]] == [
        hashlib.sha256(t.encode()).hexdigest() for t in texts
    ]
    assert meta == P.load_meta(tmp_path / "out")


def test_many_documents_split_whole_documents_deterministically(tmp_path):
    for i, t in enumerate(MANY):
        write(tmp_path / "in" / f"sub{i % 3}" / f"{i:02d}.txt", t)
    m1 = P.prepare([tmp_path / "in"], tmp_path / "a", val_fraction=0.2, verbose=False)
    m2 = P.prepare([tmp_path / "in"], tmp_path / "b", val_fraction=0.2, num_proc=1, verbose=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert m1["splits"] == m2["splits"] and m1["split"]["mode"] == "documents"
    # files are read sorted by path: sub0/00, sub0/03, ..., sub1/01, ...
    order = sorted(range(40), key=lambda i: (i % 3, i))
    want_val = [doc_tokens(MANY[i]) for i in order if P.hash_fraction(MANY[i]) < 0.2]
    want_train = [doc_tokens(MANY[i]) for i in order if P.hash_fraction(MANY[i]) >= 0.2]
    assert want_val and want_train
    assert pieces(load(tmp_path / "a", "val")) == want_val  # whole documents only, input order
    assert pieces(load(tmp_path / "a", "train")) == want_train
    assert m1["splits"]["val"]["documents"] == len(want_val)
    assert m1["splits"]["train"]["documents"] == len(want_train)


def test_val_is_never_empty(tmp_path):
    for i, t in enumerate(MANY[:25]):
        write(tmp_path / "in" / f"{i:02d}.txt", t)
    meta = P.prepare([tmp_path / "in"], tmp_path / "out", val_fraction=1e-12, verbose=False)
    smallest = min(MANY[:25], key=P.hash_fraction)
    assert pieces(load(tmp_path / "out", "val")) == [doc_tokens(smallest)]
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 24


def test_plan_split_token_tail():
    # doc 0 is cut: on both sides
    assert P.plan_split([10, 6], [0.5, 0.5], 0.01) == (
        "tokens",
        [(0, 8, "train"), (8, 16, "val")],
        {"train": 1, "val": 2},
    )
    n = 1_000_000
    mode, ranges, docs = P.plan_split([n], [0.0], 0.01)
    assert ranges == [(0, n - 10_000, "train"), (n - 10_000, n, "val")]
    assert P.plan_split([5000], [0.0], 0.01)[1][1] == (5000 - 1025, 5000, "val")


def test_doc_separator(tmp_path):
    f = write(
        tmp_path / "stories.txt",
        "Once upon a time.\n<|endoftext|>\nThe cat sat.\n<|endoftext|>\n\n",
    )
    meta = P.prepare([f], tmp_path / "out", doc_separator="<|endoftext|>", verbose=False)
    stream = np.concatenate([load(tmp_path / "out", "train"), load(tmp_path / "out", "val")])
    assert pieces(stream) == [doc_tokens("Once upon a time."), doc_tokens("The cat sat.")]
    assert meta["total_documents"] == 2 and meta["inputs"][0]["documents"] == 2


def test_chunked_encoding_is_exact():
    random.seed(0)
    alphabet = [
        "a",
        "Bc",
        " ",
        "\n",
        "\n\n",
        "  ",
        "'s",
        "'",
        "12",
        "é",
        "\u3000",
        "\t",
        "\r\n",
        "!?",
        "\xa0",
    ]
    texts = ["".join(random.choice(alphabet) for _ in range(300)) for _ in range(300)]
    shakespeare = DATA / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():
        texts.append(shakespeare.read_text(encoding="utf-8"))
    for t in texts:
        parts = P.chunk_text(t, size=7 if len(t) < 1000 else 5000)
        assert "".join(parts) == t
        assert [x for p in parts for x in enc.encode_ordinary(p)] == enc.encode_ordinary(t)
    if shakespeare.exists():  # a long text really is cut into several chunks
        assert len(P.chunk_text(texts[-1], 5000)) > 1


# -----------------------------------------------------------------------------
# errors: one line on stderr, exit 1, nothing written or changed


def test_error_no_input_files(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    r = cli("--input", tmp_path / "empty_folder", "--out_dir", tmp_path / "out")
    assert (
        r.returncode == 1
        and r.stderr.strip() == f"error: no .txt files found in folder {tmp_path / 'empty_folder'}"
    )
    r = cli("--input", tmp_path / "missing.txt", "--out_dir", tmp_path / "out")
    assert (
        r.returncode == 1 and "error: input not found" in r.stderr and "Traceback" not in r.stderr
    )
    assert not (tmp_path / "out").exists()


def test_error_all_empty_and_warning_for_some_empty(tmp_path, capsys):
    write(tmp_path / "in" / "a.txt", "")
    write(tmp_path / "in" / "b.txt", "  \n\t\n")
    r = cli("--input", tmp_path / "in", "--out_dir", tmp_path / "out")
    assert r.returncode == 1 and "error: no text" in r.stderr and "a.txt" in r.stderr
    assert not (tmp_path / "out").exists()
    write(tmp_path / "in" / "c.txt", "Some real text.")
    meta = P.prepare([tmp_path / "in"], tmp_path / "out", verbose=False)
    assert "warning: skipping empty file" in capsys.readouterr().err
    assert meta["total_documents"] == 1 and [i["documents"] for i in meta["inputs"]] == [0, 0, 1]


def test_error_not_utf8_leaves_existing_outputs_untouched(tmp_path):
    good = write(tmp_path / "good.txt", "Good text here.\n")
    P.prepare([good], tmp_path / "out", verbose=False)
    before = snapshot(tmp_path / "out")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("héllo wörld".encode("latin-1"))
    r = cli("--input", good, bad, "--out_dir", tmp_path / "out", "--overwrite")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "latin1.txt is not UTF-8" in r.stderr and "offset 1" in r.stderr
    assert snapshot(tmp_path / "out") == before
    r = cli("--input", bad, "--out_dir", tmp_path / "fresh")
    assert r.returncode == 1 and not (tmp_path / "fresh").exists()


def test_rerun_is_noop_and_other_corpus_is_refused(tmp_path):
    a = write(tmp_path / "a.txt", "Corpus A.\n")
    b = write(tmp_path / "b.txt", "Corpus B, different.\n")
    out = tmp_path / "out"
    r = cli("--input", a, "--out_dir", out)
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    r = cli("--input", a, "--out_dir", out)  # same corpus, same settings
    assert r.returncode == 0 and "already prepared" in r.stdout
    assert snapshot(out) == before
    for args in (["--input", b], ["--input", a, "--val_fraction", "0.02"]):
        r = cli(*args, "--out_dir", out)
        assert r.returncode == 1 and "different corpus" in r.stderr and "--overwrite" in r.stderr
        assert snapshot(out) == before
    r = cli("--input", b, "--out_dir", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert P.load_meta(out)["inputs"][0]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


def test_bins_without_meta_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x00\x01")
    with pytest.raises(P.PrepareError, match="no meta.json"):
        P.prepare([write(tmp_path / "a.txt", "text")], out, verbose=False)
    assert os.listdir(out) == ["train.bin"]


def test_failure_midway_removes_temp_files(tmp_path, monkeypatch):
    a = write(tmp_path / "a.txt", "Corpus A.\n")
    P.prepare([a], tmp_path / "out", verbose=False)
    before = snapshot(tmp_path / "out")

    def broken(paths, doc_separator=None):
        yield "first document"
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(P, "read_documents", broken)
    b = write(tmp_path / "b.txt", "Corpus B.\n")
    with pytest.raises(RuntimeError):
        P.prepare([b], tmp_path / "out", overwrite=True, verbose=False)
    assert snapshot(tmp_path / "out") == before  # no temp files, old corpus intact
    with pytest.raises(RuntimeError):
        P.prepare([b], tmp_path / "fresh", verbose=False)
    assert not (tmp_path / "fresh").exists()


# -----------------------------------------------------------------------------
# named sources


def test_offline_source_gives_clear_error(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        sources.fetch_source("shakespeare", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert (
        sources.SOURCES["shakespeare"][0] in msg
        and "--input PATH/TO/tinyshakespeare/input.txt" in msg
    )
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # no half-downloaded file
    with pytest.raises(SystemExit) as e:
        P.main(
            [
                "--source",
                "tinystories",
                "--out_dir",
                str(tmp_path / "out"),
                "--cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download https://huggingface.co/")
    assert "--doc_separator" in err[0] and not (tmp_path / "out").exists()
    # a separator given with a named source was dropped without a word: refused before any download
    with pytest.raises(SystemExit) as e:
        P.main(
            [
                "--source",
                "shakespeare",
                "--doc_separator",
                "\n\n",
                "--out_dir",
                str(tmp_path / "out"),
            ]
        )
    assert e.value.code == 2 and "split its own way" in capsys.readouterr().err


def test_download_is_cached(tmp_path, monkeypatch):
    calls = []

    class FakeResponse:
        headers = {"Content-Length": "12"}

        def __init__(self):
            self.data = [b"To be, or no", b""]

        def read(self, n):
            return self.data.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse()
    )
    path, sep = sources.fetch_source("shakespeare", cache_dir=tmp_path)
    assert path.read_bytes() == b"To be, or no" and sep is None and len(calls) == 1
    assert sources.fetch_source("shakespeare", cache_dir=tmp_path)[0] == path and len(calls) == 1


def test_download_cut_short_is_not_cached(tmp_path):
    """A server that closes the connection early (here after 10 of the 1,000 bytes it announced):
    urllib reads that as a clean end, and the short file used to be cached as complete and reused
    forever."""
    import socket
    import threading

    from cocomix.weights import download

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)

    def serve(bodies):
        for body in bodies:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body)
            conn.close()

    thread = threading.Thread(target=serve, args=([b"x" * 10, b"y" * 1000],), daemon=True)
    thread.start()
    url, path = (
        f"http://127.0.0.1:{server.getsockname()[1]}/input.txt",
        tmp_path / "cache" / "input.txt",
    )
    with pytest.raises(RuntimeError, match="closed after 10 of 1,000 bytes"):
        download(url, str(path), "--input FILE")
    # no file, no temporary left
    assert not path.exists() and not list((tmp_path / "cache").iterdir())
    assert open(download(url, str(path), "--input FILE"), "rb").read() == b"y" * 1000
    thread.join(5)
    server.close()


def test_offline_tokenizer_gives_one_line_error(tmp_path, monkeypatch, capsys):
    """No tokenizer files and no network: corpus.tokenizer's one line, exit 1, nothing written."""

    def offline(name):
        raise ConnectionError("Temporary failure in name resolution")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    a = write(tmp_path / "a.txt", "Some text.\n")
    with pytest.raises(SystemExit) as e:
        P.main(["--input", str(a), "--out_dir", str(tmp_path / "out")])
    assert e.value.code == 1
    err = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and not line.startswith("encoding:")
    ]
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "tokenizer is unavailable (ConnectionError)" in err[0]
        and "TIKTOKEN_CACHE_DIR" in err[0]
    ), err
    assert not (tmp_path / "out").exists()


def test_openwebtext_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(P.PrepareError, match="pip install datasets"):
        P.prepare_source("openwebtext", tmp_path / "out", cache_dir=tmp_path, verbose=False)


# -----------------------------------------------------------------------------
# real text, when ../shared/data is there


@pytest.mark.skipif(not (DATA / "gutenberg").is_dir(), reason="no gutenberg under COCOMIX_DATA")
def test_gutenberg_subset(tmp_path):
    books = sorted((DATA / "gutenberg").glob("*.txt"), key=lambda p: p.stat().st_size)[:20]
    meta = P.prepare(books, tmp_path / "out", verbose=False)
    texts = [b.read_text(encoding="utf-8") for b in sorted(books)]
    assert meta["split"]["mode"] == "documents" and meta["total_documents"] == 20
    train, val = pieces(load(tmp_path / "out", "train")), pieces(load(tmp_path / "out", "val"))
    assert sorted(train + val) == sorted(doc_tokens(t) for t in texts)
    assert len(val) >= 1 and json.loads((tmp_path / "out" / "meta.json").read_text())["splits"][
        "val"
    ]["documents"] == len(val)


class FakeDataset:
    """The parts of a Hugging Face Dataset that prepare_source uses: rows of {"text"}, len, a
    fingerprint, and train_test_split (a fixed shuffle here, recording how it was called)."""

    calls = []

    def __init__(self, texts):
        self.texts, self._fingerprint = list(texts), f"fp{len(texts)}"

    def __len__(self):
        return len(self.texts)

    def __iter__(self):
        return iter({"text": t} for t in self.texts)

    def train_test_split(self, **kw):
        FakeDataset.calls.append(kw)
        order = np.random.default_rng(kw["seed"]).permutation(len(self.texts))
        n_test = max(1, round(kw["test_size"] * len(self.texts)))
        pick = lambda idx: FakeDataset([self.texts[i] for i in idx])
        return {"train": pick(order[n_test:]), "test": pick(order[:n_test])}


def test_openwebtext_uses_nanogpts_split(tmp_path, monkeypatch):
    """--source openwebtext splits as nanoGPT's openwebtext/prepare.py (which the released code
    uses): train_test_split(test_size=0.0005, seed=2357, shuffle=True) on the Hugging Face dataset,
    its 'test' part as val.bin, each part's documents in the order the split gives them. datasets is
    stubbed (optional, and offline here)."""
    texts = [f"Document number {i} of the web text." for i in range(40)] + ["  "]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, **kw: FakeDataset(texts)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    FakeDataset.calls.clear()
    meta = P.prepare_source("openwebtext", tmp_path / "out", cache_dir=tmp_path, verbose=False)
    assert FakeDataset.calls == [dict(test_size=0.0005, seed=2357, shuffle=True)]
    parts = FakeDataset(texts).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    enc = P.get_encoding()
    for side, part in (("train", parts["train"]), ("val", parts["test"])):
        want = [t for d in part.texts if d.strip() for t in enc.encode_ordinary(d) + [50256]]
        got = np.fromfile(tmp_path / "out" / f"{side}.bin", dtype=np.uint16).tolist()
        assert got == want, side
    assert meta["split"]["mode"] == "source" and "seed=2357" in meta["split"]["rule"]
    assert meta["splits"]["val"]["documents"] == 1


def test_a_bom_changes_no_token(tmp_path):
    """A text file with a UTF-8 BOM gives the tokens of the same file without it: the BOM is not
    text (it would be a token of its own at the start of the first document)."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    plain = write(tmp_path / "plain" / "input.txt", text)
    bom = tmp_path / "bom" / "input.txt"
    bom.parent.mkdir()
    bom.write_bytes("\ufeff".encode() + plain.read_bytes())
    for src in (plain, bom):
        P.prepare([str(src)], str(src.parent / "out"), verbose=False)
    for split in ("train", "val"):
        assert np.array_equal(load(plain.parent / "out", split), load(bom.parent / "out", split))
    assert len(load(plain.parent / "out", "train")) > 0
