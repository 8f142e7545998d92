"""
The named sources of `python prepare.py --source NAME`: where each comes from, how its files cut
into documents, and OpenWebText's own train/val split (nanoGPT's). prepare.py turns what these give
into token files; failures here (offline, a missing package) are one-line RuntimeErrors.
"""

import os
from pathlib import Path

import cocomix.weights as weights

TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
SOURCES = {  # name -> (url, document separator, what to pass instead when offline)
    "shakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        None,
        "--input PATH/TO/tinyshakespeare/input.txt",
    ),
    "tinystories": (
        TINYSTORIES + "TinyStoriesV2-GPT4-valid.txt",
        "<|endoftext|>",
        "--input TinyStoriesV2-GPT4-valid.txt --doc_separator '<|endoftext|>'",
    ),
    "openwebtext": (None, None, None),  # via the optional `datasets` package
}

OPENWEBTEXT_SPLIT = dict(
    test_size=0.0005, seed=2357, shuffle=True
)  # nanoGPT's openwebtext/prepare.py


def fetch_source(name, cache_dir=weights.CACHE_DIR):
    """Downloads (or finds in cache_dir) a named file source; returns (path, doc_separator)."""
    if name not in SOURCES or SOURCES[name][0] is None:
        raise RuntimeError(f"unknown file source {name!r}; choose from {', '.join(SOURCES)}")
    url, doc_separator, hint = SOURCES[name]
    path = Path(cache_dir) / name / url.rsplit("/", 1)[1]
    # once: cached, atomic, with a progress bar
    return Path(weights.download(url, str(path), hint)), doc_separator


def openwebtext(cache_dir=weights.CACHE_DIR, num_proc=1):
    """Skylion007/openwebtext through the optional `datasets` package, split as nanoGPT splits it.
    Returns (documents, inputs): (text, 'train' or 'val') pairs in the split's order, empty ones
    left out, and the record of the input for meta.json."""
    try:
        import datasets  # optional and heavy, so only imported here
    except ImportError:
        raise RuntimeError(
            "--source openwebtext needs the optional 'datasets' package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(
            "Skylion007/openwebtext",
            split="train",
            num_proc=num_proc,
            cache_dir=os.path.join(cache_dir, "openwebtext"),
        )
    except Exception as e:
        raise RuntimeError(
            f"could not load openwebtext with datasets ({type(e).__name__}: {e})"
        ) from None
    # the dataset's fingerprint stands in for a file hash in the "already prepared" check
    inputs = [
        {
            "path": "huggingface:Skylion007/openwebtext:train",
            "rows": len(ds),
            "sha256": ds._fingerprint,
        }
    ]
    # nanoGPT's split, so the validation set is nanoGPT's and the released code's
    parts = ds.train_test_split(**OPENWEBTEXT_SPLIT)
    docs = (
        (text, side)
        for side, part in (("train", parts["train"]), ("val", parts["test"]))
        for text in (row["text"] for row in part)
        if text.strip()
    )
    return docs, inputs
