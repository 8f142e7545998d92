"""
Weight files read without running code: safetensors parsed by hand with the header validated,
torch files only through torch.load(weights_only=True), and GPT-2's files from the Hugging Face hub.
"""

import functools
import hashlib
import json
import math
import os
import pickle
import struct
import sys
import time

import torch

# downloaded by GPT.from_pretrained when online
GPT2_NAMES = (
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
)
# stored (in, out)
GPT2_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path):
    """Read a .safetensors file into a dict of tensors, validating the header first."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(
                f"{path}: not a safetensors file (shorter than its 8-byte header length)"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(
                f"{path}: safetensors header length {n} runs "
                f"past the end of the file ({size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r}"
            ) from None
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(data) or end - start != nbytes:
            raise ValueError(
                f"{path}: tensor {name!r} has offsets {start}..{end} that do not fit its shape "
                f"{shape} or the file's {len(data)} data bytes"
            )
        out[name] = (
            torch.frombuffer(bytearray(data[start:end]), dtype=dtype).view(shape)
            if nbytes
            else torch.empty(shape, dtype=dtype)
        )
        spans.append((start, end, name))
    # two tensors sharing bytes would alias each other's values: the format forbids it, and no
    # writer makes it
    spans = sorted(s for s in spans if s[0] < s[1])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap in the file's data bytes")
    return out


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of tensors as a .safetensors file (what load_safetensors reads; shared storage
    is not kept), through a temporary file renamed into place."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        # native byte order: little-endian on x86/ARM
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for raw in chunks:
                f.write(raw)

    write_atomic(path, write)


def load_hf_state_dict(path):
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        return load_safetensors(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


# every download: GPT-2, SAEs, texts
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cocomix")


def download(url, path, hint):
    """Fetch url to path once (cached), with a progress bar, through a temporary file so the cache
    never holds half a file. Offline, a one-line RuntimeError names the local-path alternative."""
    import urllib.error
    import urllib.request

    from cocomix.progress import progress_bar

    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with progress_bar(
                total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}"
            ) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            # a connection closed early reads as a short, clean end
            if total is not None and bar.n != total:
                raise OSError(f"connection closed after {bar.n:,} of {total:,} bytes")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({getattr(e, 'reason', e)}); "
            f"offline? use a local copy: {hint}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# OpenAI's GPT-2 small SAEs, by name: 'openai:<location>/<layer>'
OPENAI_SAE_URL = (
    "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/"
    "{location}/autoencoders/{layer}.pt"
)


def openai_name(path):
    """'openai:<location>/<layer>' -> (location, layer), the paper's location when none is given;
    None for a path."""
    if not path.startswith("openai:"):
        return None
    location, _, layer = path.removeprefix("openai:").rpartition("/")
    return location or "resid_post_mlp_v5_32k", int(layer)


def sae_file(path):
    """The file behind an SAE path: for an OpenAI name, where its download is kept (there or not
    yet)."""
    name = openai_name(path)
    return os.path.join(CACHE_DIR, "openai_sae", name[0], f"{name[1]}.pt") if name else path


def download_openai_sae(path):
    """Fetch one of OpenAI's GPT-2 small SAEs (the paper's: openai:resid_post_mlp_v5_32k/5) into the
    cache."""
    location, layer = openai_name(path)
    return download(
        OPENAI_SAE_URL.format(location=location, layer=layer),
        sae_file(path),
        f"SAE.load('/path/to/{layer}.pt', layer={layer})",
    )


def download_gpt2(name):
    """config.json and model.safetensors of a GPT-2 from the Hugging Face hub, cached."""
    cache_dir = os.path.join(CACHE_DIR, name)
    for fname in ("config.json", "model.safetensors"):
        download(
            f"https://huggingface.co/{name}/resolve/main/{fname}",
            os.path.join(cache_dir, fname),
            "a folder with config.json and model.safetensors, e.g. --init_from=/path/to/gpt2",
        )
    return cache_dir


def gpt2_folder(path):
    """A GPT-2 name (GPT2_NAMES) -> its downloaded folder (cached after the first time); a path as
    it is, including a local folder that happens to bear such a name."""
    return download_gpt2(path) if path in GPT2_NAMES and not os.path.isdir(path) else path


def first_line(e, limit=200):
    """'Type: first line of the message' of an exception, or just its type when the message is empty
    (an EOFError from a zero-length file has none)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def load_torch_file(path, what, map_location="cpu", verify=True):
    """torch.load(weights_only=True), every failure a one-line ValueError naming `what` the file
    should be ('checkpoint', 'SAE file'). No pickle code ever runs, and torch's advice to retry with
    weights_only=False (which would run it) is never passed on. The content digest that save_atomic
    stores is checked (verify=False: not, for timing it)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty (0 bytes), not a readable {what}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: not a readable {what} (not a torch file of plain tensors, or truncated)"
        ) from None
    except Exception as e:  # truncated or foreign files fail here, never by running them
        raise ValueError(f"{path}: not a readable {what} ({first_line(e)})") from None
    if isinstance(obj, dict) and verify:
        check_digest(obj, path, what)
    return obj


def save_atomic(obj, path):
    """torch.save through a temporary file renamed into place: a crash or a full disk leaves the
    previous file as it was and no temporary one. A failed write is an OSError with a one-line
    message. A dict is saved with the content digest of its tensors, which load_torch_file
    checks."""
    if isinstance(obj, dict):
        obj = {**obj, "digest": content_digest(obj)}
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


DIGEST_CHUNK = 1 << 24  # bytes per CRC-32: pieces of large tensors are checksummed in parallel


def tensors_in(obj, path=""):
    """(path, tensor) of every tensor in nested dicts, lists and tuples, in their order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{path}/{i}")


def content_digest(obj):
    """Digest of the tensors of a checkpoint-like dict (its 'digest' entry aside): their names,
    dtypes, shapes and bytes. The bytes are checksummed with CRC-32 per 16 MiB piece, on every core
    (zlib releases the GIL), and the checksums hashed with SHA-256: it is there to catch damaged or
    edited files at the memory bandwidth of a load, not a forger, and a full SHA-256 of a 124M
    model's checkpoint took 3-4x as long (docs/benchmarks.md, "Digest checks")."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    names, pieces = [], []
    for name, t in tensors_in({k: v for k, v in obj.items() if k != "digest"}):
        names.append(f"{name}:{t.dtype}:{tuple(t.shape)}")
        flat = t.detach().cpu().contiguous().reshape(-1)
        raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        pieces += [raw[i : i + DIGEST_CHUNK] for i in range(0, len(raw), DIGEST_CHUNK)] or [raw]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        crcs = list(pool.map(zlib.crc32, pieces))
    h = hashlib.sha256("\n".join(names).encode())
    h.update(struct.pack(f"<{len(crcs)}I", *crcs))
    return "crc32x16M-sha256:" + h.hexdigest()


_noted = set()


def check_digest(obj, path, what):
    """A ValueError naming path when its tensors are not the ones it was saved with; a one-line note
    (once per file) when a file of ours predates digests."""
    if "digest" in obj:
        if obj["digest"] != content_digest(obj):
            raise ValueError(
                f"{path}: its tensors do not match the digest it was saved with (changed or "
                f"damaged since it was written); not a trustworthy {what}"
            )
    elif ("model_args" in obj or "state_dict" in obj or "train" in obj) and path not in _noted:
        _noted.add(path)
        print(
            f"note: {path} has no content digest (written before they were kept); loaded unchecked",
            file=sys.stderr,
        )


def write_atomic(path, content):
    """content (str, bytes, or a function writing the file named by its argument) to path through a
    temporary file renamed into place: a full disk, a read-only folder or an interrupt leaves the
    previous file as it was (or none) and no temporary or empty one. A failed write is an OSError
    with a one-line message naming path."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        # torch's zip writer reports a failed write as a RuntimeError
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        kept = "; the previous file is unchanged" if os.path.exists(path) else ""
        raise OSError(
            f"cannot write {path} ({why}; {free_bytes(path):,} bytes free there){kept}"
        ) from None


def free_bytes(path):
    """Space left on the disk that holds path (a file or folder, existing or not), for error
    messages."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def file_sha256(path):
    """SHA-256 of a file, read once per version of it (path, size, mtime) in a process: a run asks
    for its concept source's and SAE's several times (host check, resume, label cache), and a GPT-2
    file is 0.5 GB."""
    st = os.stat(path)
    if time.time() - st.st_mtime < 2:
        # written just now: a rewrite within the file system's timestamp tick (a few ms) would
        # keep size and mtime, so a file this fresh is hashed, not looked up (as git treats
        # "racily clean" files)
        return _file_sha256.__wrapped__(path, st.st_size, st.st_mtime_ns)
    return _file_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache
def _file_sha256(path, size, mtime_ns):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_sha256(path):
    """Content hash of a concept source as checkpoint.load_frozen_gpt reads it: our checkpoint (or
    the ckpt.pt in a folder), or a Hugging Face GPT-2 folder's config.json and weights file."""
    path = gpt2_folder(path)
    if os.path.exists(os.path.join(path, "config.json")):
        weights = os.path.join(path, "model.safetensors")
        # load_hf_state_dict's order
        weights = weights if os.path.exists(weights) else os.path.join(path, "pytorch_model.bin")
        both = file_sha256(os.path.join(path, "config.json")) + file_sha256(weights)
        return hashlib.sha256(both.encode()).hexdigest()
    return file_sha256(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)


def read_gpt2_config(path):
    """(config.json of a Hugging Face GPT-2 folder, the folder); a GPT-2 name downloads first."""
    path = gpt2_folder(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"{path}: activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU"
        )
    # variants of GPT-2 that Hugging Face's class runs and ours would run as plain GPT-2, wrongly
    for key, gpt2 in (
        ("tie_word_embeddings", True),
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
    ):
        if hf.get(key, gpt2) != gpt2:
            raise ValueError(
                f"{path}: config.json sets {key}={hf[key]}; "
                f"only GPT-2's own ({key}={gpt2}) is supported"
            )
    return hf, path


def copy_gpt2_weights(model, path):
    """Hugging Face GPT-2 weights from the folder `path` into our GPT (same names, HF's layout)."""
    sd = load_hf_state_dict(path)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    # the published gpt2 files carry attention-mask buffers; they are not weights
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    head = sd.pop("lm_head.weight", None)  # tied to wte: a copy of it, if there at all
    if head is not None and "wte.weight" in sd and not torch.equal(head, sd["wte.weight"]):
        raise ValueError(f"{path}: its lm_head.weight differs from wte.weight; GPT-2 ties them")
    own = {
        k.removeprefix("transformer."): p
        for k, p in model.state_dict().items()
        if k != "lm_head.weight" and not k.startswith(("mixer.", "pause"))
    }
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a GPT-2 checkpoint (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]})"
        )
    with torch.no_grad():
        for k, p in own.items():
            w = sd[k].t() if k.endswith(GPT2_CONV1D) else sd[k]  # HF's Conv1D stores (in, out)
            # integer weights would be copied as numbers, silently wrong
            if not w.is_floating_point():
                raise ValueError(
                    f"{path}: {k} has dtype {w.dtype}; GPT-2 weights are floating point"
                )
            if w.shape != p.shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(w.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(w)
