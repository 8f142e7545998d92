"""
The concept-label cache: the labels of a window of tokens are computed once (sae.ConceptLabeler) and
read by every later run, DDP rank and ablation with the same concept source, SAE and label settings.

Batches are drawn from a fixed grid of block_size windows (train.py), and a window's labels depend
only on its tokens, the source, the SAE and the label settings, so they can be kept next to the
token file.
"""

import hashlib
import json
import mmap
import os
import sys

import numpy as np
import torch

from cocomix.runtime import to_device
from cocomix.weights import file_sha256, source_sha256

LABELS_VERSION = 2  # bump when the labels' arithmetic changes, so that no older cache is served


def label_identity(labeler, source_path, sae_path, dtype):
    """Everything a window's labels depend on besides its tokens and block_size (LabelCache adds
    those). The device kind (cpu, cuda) and, on CUDA, TF32 are in it too: the source's passes round
    differently on another kind of device, which can swap near-tied labels, so a cache is only
    reused on the kind of device that made it (not checked: another GPU model or PyTorch version,
    which can round differently too). (On CUDA the attention backward is not deterministic either;
    near ties can differ between runs.)"""
    device = next(labeler.sae.parameters()).device.type
    return {
        "version": LABELS_VERSION,
        "source_sha256": source_sha256(source_path),
        "sae_sha256": file_sha256(sae_path),
        "sae_layer": labeler.layer,
        "k_attr": labeler.k_attr,
        "label_rule": labeler.rule,
        "label_fill": labeler.fill,
        # 'released' fills with zero-score latents in CUDA's order (+0 above -0) since this key
        **({"zero_order": "cuda"} if labeler.fill == "released" else {}),
        "n_concepts": labeler.sae.n_latents,
        "dtype": dtype,
        "device": device,
        **({"tf32": torch.backends.cuda.matmul.allow_tf32} if device == "cuda" else {}),
    }


class LabelCache:
    """Concept labels of the block_size windows of one token file (window w: the tokens
    [w T, w T + T + 1)), computed on first use and kept next to that file:

        labels-<digest>.json   what the labels depend on (`label_identity`, block_size, the token
                               file); <digest> is a hash of it, so other settings never open the
                               same files
        labels-<digest>.bin    n_windows x T x k_attr labels (-1 = none), int16 while C <= 32768
        labels-<digest>.done   per window: keyed hashes of the tokens its labels were computed from
                               and of the labels as stored, 0 = none

    A window's stored labels are used only when its .done entry holds the hash of the tokens asked
    for and the hash of the labels found, both keyed with <digest>, and every label lies in [-1, C):
    a changed token file, files renamed from another cache, labels written but never marked (a
    crash) or edited afterwards all read as misses and are recomputed, never served. Processes (DDP
    ranks) share the files: they only ever write the same values for the same window. A full disk
    turns the cache off (with a warning), never the run: the labels are then computed as without
    one."""

    def __init__(self, labeler, data_dir, split, block_size, identity):
        self.labeler = labeler
        tokens = os.path.join(data_dir, f"{split}.bin")
        data_meta = os.path.join(data_dir, "meta.json")
        n_windows = (os.path.getsize(tokens) // 2 - 1) // block_size  # train.py's grid
        C, K = identity["n_concepts"], identity["k_attr"]
        self.meta = {
            **identity,
            "block_size": block_size,
            "tokens_file": f"{split}.bin",
            "tokens_bytes": os.path.getsize(tokens),
            "n_windows": n_windows,
            # meta.json (prepare.py) names the corpus, so a re-prepared one gets new files; the
            # tokens themselves are checked window by window (.done), so this need not be exact
            "data_meta_sha256": file_sha256(data_meta) if os.path.exists(data_meta) else None,
            "label_dtype": "int16" if C <= 32768 else "int32",
        }  # labels run from -1 to C - 1
        self.digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[
            :16
        ]
        self.base = os.path.join(data_dir, f"labels-{self.digest}")
        self._claim(self.base + ".json")
        self.table = self._open(
            self.base + ".bin", np.dtype(self.meta["label_dtype"]), (n_windows, block_size, K)
        )
        # (tokens, labels) hashes
        self.done = self._open(self.base + ".done", np.dtype(np.uint64), (n_windows, 2))
        self.n_concepts, self.off = C, False
        self.hits = self.misses = self.rejected = (
            0  # windows served from disk / computed / found tampered, by this process
        )

    def _claim(self, path):
        """Write the identity record, or check the one found: a mismatch means hand-made files."""
        if not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.meta, f, indent=2, sort_keys=True)
                os.replace(tmp, path)  # atomic; ranks racing here write the same text
            finally:
                if os.path.exists(tmp):  # a full disk
                    os.remove(tmp)
        with open(path) as f:
            try:
                found = json.load(f)
            except json.JSONDecodeError:
                found = {}
        if found != self.meta:
            keys = sorted(
                k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k)
            )
            raise ValueError(
                f"label cache {path} does not describe this run (differs in {', '.join(keys)}): "
                f"renamed or edited by hand? delete {self.base}.* or run with --label_cache=False"
            )

    @staticmethod
    def _open(path, dtype, shape):
        nbytes = int(np.prod(shape)) * dtype.itemsize
        # 'ab' creates a missing file but never truncates one another process is filling; growing a
        # new file to its size leaves it sparse and all zeros (no window done), and two processes
        # growing it at once is harmless: the second truncate to the same size changes nothing
        with open(path, "ab") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                f.truncate(nbytes)
            elif size != nbytes:
                raise ValueError(
                    f"label cache {path} has {size} bytes, expected {nbytes}: delete it"
                )
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def _fingerprints(self, *arrays):
        """Per window (row of the arrays), a 64-bit hash of its rows' bytes keyed with the digest;
        never 0, which marks 'not done'."""
        key = bytes.fromhex(self.digest)
        fps = [
            int.from_bytes(
                hashlib.blake2b(
                    b"".join(np.ascontiguousarray(r).tobytes() for r in rows),
                    digest_size=8,
                    key=key,
                ).digest(),
                "little",
            )
            for rows in zip(*arrays)
        ]
        return np.array(fps, dtype=np.uint64) | np.uint64(1)

    def _allocate(self, windows):
        """Give the files' bytes of these windows disk space before they are touched through the
        memory maps: there a full disk is a SIGBUS that kills the process (when writing, and on
        tmpfs even when reading a hole), here it is an OSError. Whole pages, since a page is what a
        map faults in and writes back; bytes that have their space already cost nothing."""
        for path, arr in ((self.base + ".bin", self.table), (self.base + ".done", self.done)):
            row = arr[0].nbytes
            fd = os.open(path, os.O_RDWR)
            try:
                for w in np.unique(windows).tolist():
                    start = w * row // mmap.PAGESIZE * mmap.PAGESIZE
                    os.posix_fallocate(
                        fd,
                        start,
                        min(-(-(w + 1) * row // mmap.PAGESIZE) * mmap.PAGESIZE, arr.nbytes) - start,
                    )
            finally:
                os.close(fd)

    def _store(self, windows, labels, fps):
        """Write labels and then their marks; a crash in between leaves windows unmarked (recomputed
        later)."""
        self.table[windows] = labels
        self.table.flush()  # the labels reach the file before the mark that says they are there
        self.done[windows] = np.stack([fps, self._fingerprints(labels)], axis=1)

    def _turn_off(self, e):
        self.off = True
        print(
            f"warning: label cache off ({e.strerror or e}; {self.base}.*): labels are computed for "
            "every batch from now on",
            file=sys.stderr,
        )

    def labels(self, windows, x, y, device="cpu"):
        """Labels (B, T, k_attr) on `device` for the windows `windows` (B indices into the grid)
        whose tokens are x and targets y (B, T, in host memory: hashing them costs no device read),
        as ConceptLabeler gives them for x, y on `device`. Call under the same autocast. Only a miss
        waits for the device."""
        windows = np.asarray(windows, dtype=np.int64)
        if not self.off:
            try:
                self._allocate(windows)
            except OSError as e:  # a full disk
                self._turn_off(e)
        if self.off:
            self.misses += len(windows)
            return self.labeler(x.to(device), y.to(device))
        fps = self._fingerprints(x.numpy(), y.numpy())
        stored, marks = np.array(self.table[windows]), np.array(self.done[windows])
        intact = (marks[:, 1] == self._fingerprints(stored)) & (
            (stored >= -1) & (stored < self.n_concepts)
        ).all(axis=(1, 2))
        hit = (marks[:, 0] == fps) & intact
        if tampered := int(((marks[:, 0] == fps) & ~intact).sum()):
            if not self.rejected:
                print(
                    f"warning: {self.base}.bin: stored labels of {tampered} window(s) fail their "
                    "checksum or range (edited or damaged); recomputed",
                    file=sys.stderr,
                )
            self.rejected += tampered
        out = torch.from_numpy(stored.astype(np.int64))
        miss = np.flatnonzero(~hit)
        if len(miss):
            # one labeler call for all missing windows (a window drawn twice is simply computed
            # twice)
            new = self.labeler(x[miss].to(device), y[miss].to(device)).cpu()
            try:
                self._store(windows[miss], new.numpy().astype(self.table.dtype), fps[miss])
            except OSError as e:
                self._turn_off(e)
            out[torch.from_numpy(miss)] = new
        self.hits += len(windows) - len(miss)
        self.misses += len(miss)
        return to_device(out, device)


def open_label_caches(labeler, data_dir, block_size, source_path, sae_path, dtype):
    """One LabelCache per token file, {'train': ..., 'val': ...}; {} (labels computed for every
    batch) when the data folder cannot hold them, e.g. read-only: slower, not wrong."""
    try:
        identity = label_identity(labeler, source_path, sae_path, dtype)
        return {s: LabelCache(labeler, data_dir, s, block_size, identity) for s in ("train", "val")}
    except OSError as e:
        print(
            f"warning: label cache off ({e}); labels are computed for every batch", file=sys.stderr
        )
        return {}
