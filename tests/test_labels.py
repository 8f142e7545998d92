"""Tests of the concept-label cache (label_cache.LabelCache) and the labeler's chunked loss. Run:
python -m pytest -q test_labels.py"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cocomix.label_cache import LabelCache, label_identity
from model import GPT, GPTConfig
from sae import SAE, ConceptLabeler
from tests.fixtures import ENV, ROOT, TINY, T, cached, write_data, write_sae, write_source


@pytest.fixture
def setup(tmp_path):
    """(data_dir, source path, SAE path, labeler, identity) for the default tiny pieces."""
    data = write_data(tmp_path / "data")
    src, sae_path = str(tmp_path / "source.pt"), str(tmp_path / "sae.pt")
    labeler = ConceptLabeler(write_source(src), write_sae(sae_path), 1, k_attr=4)
    return data, src, sae_path, labeler, label_identity(labeler, src, sae_path, "float32")


# -----------------------------------------------------------------------------
# the labeler


def test_chunked_labeler_gradient_equals_full_logits():
    """hidden_and_grad through the chunked LM-head loss gives dL/dh of L = sum over windows of each
    window's mean cross-entropy, as the full logits would."""
    torch.manual_seed(0)
    source = (
        GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=3, n_head=2, n_embd=32))
        .eval()
        .requires_grad_(False)
    )
    labeler = ConceptLabeler(source, SAE(32, 96, 8, meta={"layer": 1}), 1)
    idx, targets = torch.randint(0, 50257, (3, 12)), torch.randint(0, 50257, (3, 12))
    h, g = labeler.hidden_and_grad(idx, targets)
    leaf = h.clone().requires_grad_(True)
    logits = source.lm_head(source.forward_from(leaf, 1))
    loss = sum(F.cross_entropy(logits[b], targets[b]) for b in range(3))
    (expected,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# (1) cached labels are the on-the-fly labels


def test_cached_labels_equal_on_the_fly(setup):
    data, src, sae_path, labeler, identity = setup
    cache = LabelCache(labeler, data, "train", T, identity)
    n_windows = (1200 - 1) // T
    assert cache.table.shape == (n_windows, T, 4) and cache.table.dtype == np.int16
    # first fill, with a window drawn twice
    first = [0, 3, 5, 3]
    got, x, y = cached(cache, data, first)
    assert torch.equal(got, labeler(x, y))
    assert (cache.hits, cache.misses) == (0, 4)
    assert (got >= 0).float().mean() > 0.5  # the test must compare real labels
    # half hits, half misses: the misses run as a batch of two, and still equal the labels of this
    # batch
    second = [5, 1, 0, 7]
    got, x, y = cached(cache, data, second)
    assert torch.equal(got, labeler(x, y))
    assert (cache.hits, cache.misses) == (2, 6)
    # a fresh object (another run, another rank) reads them all from the files
    again = LabelCache(labeler, data, "train", T, identity)
    for windows in (first, second, [7, 1, 5, 0, 3]):
        got, x, y = cached(again, data, windows)
        assert torch.equal(got, labeler(x, y))
    assert (again.hits, again.misses) == (13, 0)
    meta = json.load(open(cache.base + ".json"))
    assert (
        meta["block_size"] == T
        and meta["k_attr"] == 4
        and meta["source_sha256"] == identity["source_sha256"]
    )
    assert sorted(os.listdir(data)) == sorted(
        ["train.bin", "val.bin", "meta.json"]
        + [f"labels-{cache.digest}{e}" for e in (".bin", ".done", ".json")]
    )


def test_label_width_follows_the_number_of_concepts(setup):
    """Labels run from -1 to C - 1: int16 up to the paper's C = 32768, int32 beyond."""
    data, src, sae_path, labeler, identity = setup
    for C, want in ((32768, np.int16), (32769, np.int32)):
        assert LabelCache(None, data, "train", T, {**identity, "n_concepts": C}).table.dtype == want


# -----------------------------------------------------------------------------
# (2) other sources, SAEs, corpora and window sizes are never served these labels


def test_other_settings_get_other_files(setup, tmp_path):
    data, src, sae_path, labeler, identity = setup
    base = LabelCache(labeler, data, "train", T, identity)
    cached(base, data, [0, 1, 2])
    other_src, other_sae = str(tmp_path / "source2.pt"), str(tmp_path / "sae2.pt")
    source2, sae2 = write_source(other_src, seed=1), write_sae(other_sae, seed=1)
    variants = {
        "sae": ConceptLabeler(labeler.source, sae2, 1, k_attr=4),
        "source": ConceptLabeler(source2, labeler.sae, 1, k_attr=4),
        "rule": ConceptLabeler(labeler.source, labeler.sae, 1, k_attr=4, rule="activation"),
        "fill": ConceptLabeler(labeler.source, labeler.sae, 1, k_attr=4, fill="released"),
    }
    paths = {
        "sae": (src, other_sae),
        "source": (other_src, sae_path),
        "rule": (src, sae_path),
        "fill": (src, sae_path),
    }
    digests = {base.digest}
    for name, lab in variants.items():
        cache = LabelCache(lab, data, "train", T, label_identity(lab, *paths[name], "float32"))
        got, x, y = cached(cache, data, [0, 1, 2])
        assert cache.misses == 3, name
        assert torch.equal(got, lab(x, y)), name
        assert not torch.equal(got, labeler(x, y)), name  # the old labels would have been wrong
        digests.add(cache.digest)
    # another block_size: other windows, other files
    other_T = LabelCache(labeler, data, "train", 8, identity)
    digests.add(other_T.digest)
    # the same labeler in bf16 autocast would label differently: another file
    digests.add(LabelCache(labeler, data, "train", T, {**identity, "dtype": "bfloat16"}).digest)
    # labels made on another device (or with TF32) may swap near ties: another file
    assert identity["device"] == "cpu"
    digests.add(
        LabelCache(labeler, data, "train", T, {**identity, "device": "cuda", "tf32": True}).digest
    )
    assert len(digests) == 8


def test_other_corpus_is_recomputed(setup):
    data, src, sae_path, labeler, identity = setup
    first = LabelCache(labeler, data, "train", T, identity)
    old, _, _ = cached(first, data, [0, 1, 2])
    # a re-prepared corpus (new meta.json): other files
    write_data(data, seed=1)
    moved = LabelCache(labeler, data, "train", T, identity)
    assert moved.digest != first.digest
    # tokens changed by hand, same size and meta.json: the same files, but no window is served
    meta = open(os.path.join(data, "meta.json")).read()
    write_data(data, seed=2)
    open(os.path.join(data, "meta.json"), "w").write(meta)
    same = LabelCache(labeler, data, "train", T, identity)
    assert same.digest == moved.digest
    cached(same, data, [0, 1])
    write_data(data, seed=1)
    open(os.path.join(data, "meta.json"), "w").write(meta)
    again = LabelCache(labeler, data, "train", T, identity)
    got, x, y = cached(again, data, [0, 1, 2])
    assert (again.hits, again.misses) == (0, 3)
    assert torch.equal(got, labeler(x, y)) and not torch.equal(got, old)


def test_renamed_files_are_refused_or_ignored(setup):
    data, src, sae_path, labeler, identity = setup
    a = LabelCache(labeler, data, "train", T, identity)
    cached(a, data, [0, 1, 2])
    other = {**identity, "label_rule": "activation"}
    b_lab = ConceptLabeler(labeler.source, labeler.sae, 1, k_attr=4, rule="activation")
    b = LabelCache(b_lab, data, "train", T, other)
    for ext in (".bin", ".done", ".json"):  # a's files under b's names, JSON and all: a clear error
        shutil.copy(a.base + ext, b.base + ext)
    with pytest.raises(ValueError, match=r"does not describe this run \(differs in label_rule\)"):
        LabelCache(b_lab, data, "train", T, other)
    os.remove(b.base + ".json")  # without the JSON: opened, but the marks do not match b's key
    c = LabelCache(b_lab, data, "train", T, other)
    got, x, y = cached(c, data, [0, 1, 2])
    assert c.misses == 3 and torch.equal(got, b_lab(x, y))


# -----------------------------------------------------------------------------
# (3) a crash between writing labels and marking them done


def test_unmarked_labels_are_recomputed(setup):
    data, src, sae_path, labeler, identity = setup
    cache = LabelCache(labeler, data, "train", T, identity)

    def crash():
        raise KeyboardInterrupt("killed after writing the labels, before marking them")

    cache.table.flush = crash
    with pytest.raises(KeyboardInterrupt):
        cached(cache, data, [2, 4])
    assert (cache.done[[2, 4]] == 0).all()
    cache.table[[2, 4]] = 7  # and garbage where the labels were written
    cache.table.flush = lambda: None
    fresh = LabelCache(labeler, data, "train", T, identity)
    assert (np.asarray(fresh.table[[2, 4]]) == 7).all()
    got, x, y = cached(fresh, data, [2, 4, 2])
    assert (fresh.hits, fresh.misses) == (0, 3)
    assert torch.equal(got, labeler(x, y))
    assert torch.equal(
        cached(LabelCache(labeler, data, "train", T, identity), data, [4, 2])[0], got[[1, 0]]
    )


def test_truncated_file_is_a_clear_error(setup):
    data, src, sae_path, labeler, identity = setup
    cache = LabelCache(labeler, data, "train", T, identity)
    with open(cache.base + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="has 100 bytes, expected"):
        LabelCache(labeler, data, "train", T, identity)


# -----------------------------------------------------------------------------
# (4) train.py: the cache changes no number


def test_train_same_losses_with_and_without_cache(setup, tmp_path):
    data, src, sae_path, labeler, identity = setup
    args = [
        f"--data_dir={data}",
        "--mode=cocomix",
        f"--concept_source={src}",
        f"--sae_path={sae_path}",
        *TINY,
        f"--block_size={T}",
        "--max_iters=4",
        "--eval_interval=2",
        "--concept_topk=8",
        "--learning_rate=3e-3",
    ]
    logs = {}
    for name, flag in (("cold", "True"), ("warm", "True"), ("off", "False")):
        out = str(tmp_path / name)
        p = subprocess.run(
            [sys.executable, "train.py", f"--out_dir={out}", f"--label_cache={flag}", *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        logs[name] = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        if flag == "True":
            assert "labels cached" in p.stdout
    numbers = lambda log: [
        {
            k: v
            for k, v in r.items()
            if k in ("loss", "concept", "val/loss", "val/concept", "train/loss")
        }
        for r in log
    ]
    assert numbers(logs["cold"]) == numbers(logs["off"])
    assert numbers(logs["warm"]) == numbers(logs["off"])
    last = lambda log: [r for r in log if "label_hits" in r][-1]
    # eval windows repeat
    assert last(logs["cold"])["label_computed"] > 0 and last(logs["cold"])["label_hits"] > 0
    assert last(logs["warm"])["label_computed"] == 0
    assert not any("label_hits" in r for r in logs["off"])
