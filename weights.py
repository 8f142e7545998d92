"""
Weight files read without running code: safetensors parsed by hand with the header validated,
torch files only through torch.load(weights_only=True), and GPT-2's files from the Hugging Face hub.
"""

import json
import math
import os
import struct

import torch

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


def download_gpt2(name, cache_dir=None):
    """Fetch config.json and model.safetensors of a GPT-2 from the Hugging Face hub into a cache."""
    import urllib.request
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cocomix", name)
    os.makedirs(cache_dir, exist_ok=True)
    for fname in ("config.json", "model.safetensors"):
        dst = os.path.join(cache_dir, fname)
        if os.path.exists(dst):
            continue
        url = f"https://huggingface.co/{name}/resolve/main/{fname}"
        try:
            urllib.request.urlretrieve(url, dst + ".tmp")
        except OSError as e:
            raise RuntimeError(f"could not download {url} ({e}); pass a local folder with config.json and "
                               f"model.safetensors instead, e.g. --init_from=/path/to/gpt2") from None
        os.replace(dst + ".tmp", dst)
    return cache_dir
