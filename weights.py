"""
Weight files read without running code: safetensors parsed by hand with the header validated,
torch files only through torch.load(weights_only=True), and GPT-2's files from the Hugging Face hub.
"""

import hashlib
import json
import math
import os
import struct

import torch

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # downloaded by GPT.from_pretrained when online
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """Read a .safetensors file into a dict of tensors, validating the header first."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(data) or end - start != nbytes:
            raise ValueError(f"{path}: tensor {name!r} has offsets {start}..{end} that do not fit its shape "
                             f"{shape} or the file's {len(data)} data bytes")
        out[name] = torch.frombuffer(bytearray(data[start:end]), dtype=dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return out


def load_hf_state_dict(path):
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        return load_safetensors(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def download(url, path, hint):
    """Fetch url to path once (cached), with a progress bar, through a temporary file so the cache
    never holds half a file. Offline, a one-line RuntimeError names the local-path alternative."""
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"could not download {url} ({getattr(e, 'reason', e)}); offline? use a local copy: {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def download_gpt2(name, cache_dir=None):
    """config.json and model.safetensors of a GPT-2 from the Hugging Face hub, cached."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cocomix", name)
    for fname in ("config.json", "model.safetensors"):
        download(f"https://huggingface.co/{name}/resolve/main/{fname}", os.path.join(cache_dir, fname),
                 "a folder with config.json and model.safetensors, e.g. --init_from=/path/to/gpt2")
    return cache_dir


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_gpt2_config(path):
    """(Hugging Face config.json of a GPT-2 folder, the folder); a GPT-2 name is downloaded first."""
    if path in GPT2_NAMES and not os.path.isdir(path):
        path = download_gpt2(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{path}: activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU")
    return hf, path


def copy_gpt2_weights(model, path):
    """Hugging Face GPT-2 weights from the folder `path` into our GPT (same names, bar HF's layout)."""
    sd = load_hf_state_dict(path)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    # the published gpt2 files carry attention-mask buffers; they are not weights
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd.pop("lm_head.weight", None)  # tied to wte
    own = {k.removeprefix("transformer."): p for k, p in model.state_dict().items()
           if k != "lm_head.weight" and not k.startswith(("mixer.", "pause"))}
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise ValueError(f"{path}: not a GPT-2 checkpoint (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for k, p in own.items():
            w = sd[k].t() if k.endswith(conv1d) else sd[k]  # HF's Conv1D stores (in, out)
            if w.shape != p.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
            p.copy_(w)
