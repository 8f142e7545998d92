"""
Reading what prepare.py writes, with its checks: the uint16 token files `train.bin` / `val.bin` and
`meta.json` of a data folder, and GPT-2's tokenizer. Every script reads token files through
load_tokens, so a file of another tokenizer or garbage is refused the same way everywhere.

Offline, tiktoken reads its `gpt2` files from the folder named by the environment variable
TIKTOKEN_CACHE_DIR (see the README); online it downloads them once.
"""

import hashlib
import json
import os
import warnings

import numpy as np

VOCAB_SIZE = 50257  # GPT-2 BPE
EOT = 50256  # <|endoftext|>, which prepare.py puts after every document


class TokenizerError(RuntimeError):
    """GPT-2's tokenizer files cannot be had (offline without TIKTOKEN_CACHE_DIR)."""


def tokenizer():
    """GPT-2's BPE (tiktoken), or a one-line error saying how to make it available offline."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when it cannot download
        raise TokenizerError(
            f"GPT-2's tokenizer is unavailable ({type(e).__name__}); offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files"
        ) from None


def token_byte_lengths(enc=None):
    """UTF-8 byte length of every token's text, 0 for <|endoftext|> (not text): summed over a token
    sequence it equals the length of its decoded bytes without the EOT strings. For bits per byte.
    """
    enc = enc or tokenizer()
    lens = np.array(
        [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64
    )
    lens[enc.eot_token] = 0
    return lens


def read_meta(data_dir):
    """meta.json of a data folder, checked to describe GPT-2 BPE tokens; {} with a warning when
    absent."""
    path = os.path.join(data_dir, "meta.json")
    # prepare.py writes it last: without it the files cannot be checked against each other
    if not os.path.exists(path):
        if os.path.isdir(data_dir):  # (a missing folder is load_tokens' error)
            warnings.warn(
                f"{data_dir} has no meta.json: an unfinished prepare.py run, or token files of "
                "another tool; their dtype and sizes are not checked",
                stacklevel=3,
            )
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}); re-run prepare.py") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object; re-run prepare.py")
    if meta.get("tokenizer", "gpt2") != "gpt2":
        raise ValueError(
            f"{data_dir} was prepared with tokenizer "
            f"{meta['tokenizer']!r}; this project uses GPT-2 BPE"
        )
    if meta.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ValueError(
            f"{data_dir} was prepared with vocab_size {meta['vocab_size']}, GPT-2's is {VOCAB_SIZE}"
        )
    return meta


# token files up to 1 GiB are hashed whole, larger ones by sampled blocks
FULL_DIGEST_BYTES = 1 << 30
SAMPLED_BLOCKS, BLOCK_BYTES = 1024, 1 << 20


def token_file_digest(path):
    """What prepare.py records of a token file in meta.json, and load_tokens checks: its size and
    SHA-256, of the whole file up to 1 GiB (about a second), else of 1,024 blocks of 1 MiB evenly
    spread over it, first and last included (a swapped or rewritten file is caught; a change inside
    a few unsampled bytes of a large file is not)."""
    from cocomix.weights import file_sha256

    size = os.path.getsize(path)
    if size <= FULL_DIGEST_BYTES:
        return {"bytes": size, "sha256": file_sha256(path)}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLED_BLOCKS):
            f.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
            h.update(f.read(BLOCK_BYTES))
    return {"bytes": size, "sha256_of_sampled_blocks": h.hexdigest()}


def load_tokens(data_dir, split, min_tokens=2, need="2"):
    """DIR/{split}.bin as a read-only uint16 memmap, after checking meta.json (tokenizer, dtype, and
    the split's token count against the file's size) and, on its first million tokens, that every id
    is a GPT-2 token. need: min_tokens as the user set it."""
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: prepare a corpus first, e.g. python prepare.py --source "
            f"shakespeare --out_dir {data_dir} (or --input FILES for your own text)"
        )
    if meta.get("dtype", "uint16") != "uint16":
        raise ValueError(
            f"{data_dir}/meta.json says the tokens are "
            f"{meta['dtype']}; this project reads uint16 token files"
        )
    if os.path.getsize(path) % 2:
        raise ValueError(
            f"{path} has an odd number of bytes: not a file of uint16 tokens written by prepare.py"
        )
    n = os.path.getsize(path) // 2
    expected = (meta.get("splits") or {}).get(split, {}).get("tokens")
    # e.g. a crash of prepare.py between its files, or a hand-made mix
    if expected is not None and expected != n:
        raise ValueError(
            f"{path} holds {n} tokens but meta.json says {expected}: not the files prepare.py "
            "wrote together; re-run it"
        )
    if n < min_tokens:
        raise ValueError(f"{path} holds {n} tokens, fewer than {need} = {min_tokens}")
    recorded = (meta.get("digests") or {}).get(f"{split}.bin")
    if recorded is not None and recorded != token_file_digest(path):
        raise ValueError(
            f"{path} is not the file prepare.py wrote (its digest differs from meta.json's): "
            "replaced or damaged since; re-run prepare.py"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if tokens[:1_000_000].max() >= VOCAB_SIZE:  # garbage or another tokenizer's ids
        raise ValueError(f"{path} holds token ids >= {VOCAB_SIZE}: not GPT-2 BPE tokens")
    return tokens
