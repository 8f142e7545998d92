"""Tests of KV-cache generation, concept steering and its measurement (scripts/measure_steering.py),
inspection (cocomix/inspection.py) and the command line (sample.py). Run: python -m pytest
tests/test_sample.py -q"""

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import cocomix.inspection as inspect_html
import sample
import scripts.measure_steering as steering
from cocomix.corpus import tokenizer
from cocomix.dictionary import load_concepts
from cocomix.weights import save_atomic
from model import GPT, GPTConfig, KVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    TIKTOKEN_CACHE_DIR=os.environ.get(
        "TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "tiktoken")
    ),
)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", ENV["TIKTOKEN_CACHE_DIR"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the
    CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KINDS = {
    "plain": dict(),
    "interleave": dict(n_concepts=64, mix="interleave"),
    "add": dict(n_concepts=64, mix="add"),
    "none": dict(n_concepts=64, mix="none"),
    "pause": dict(pause=True),
}


def tiny(kind="interleave", seed=0, vocab_size=512, **kw):
    """A small random model; the CLI tests use the full GPT-2 vocabulary for tiktoken's ids."""
    args = dict(
        block_size=32,
        vocab_size=vocab_size,
        n_layer=3,
        n_head=2,
        n_embd=32,
        concept_topk=4,
        insert_layer=1,
    )
    args.update(KINDS[kind], **kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():  # random biases and gains too, so no part of the model is a no-op
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # concepts strong enough that steering shows in greedy text
        if hasattr(model, "mixer") and model.config.mix != "none":
            model.mixer.W_cmp_T.mul_(20)
    return model


def prompt(T=5, B=2, seed=1, V=512):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def strongest_concept(model, idx):
    """The concept with the highest mean predicted logit: multiplying it by 10 moves it into the
    TopK."""
    with torch.no_grad():
        return int(model.hidden_states(idx)[1].mean((0, 1)).argmax())


# -----------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("insert_layer", [0, 1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_incremental_logits_match_full_forward(kind, insert_layer):
    """Prefill, then one token per step through the cache: the logits (and z) of every position
    equal those of one full forward pass over the sequence."""
    model = tiny(kind, insert_layer=insert_layer)
    idx = prompt(T=20)
    with torch.no_grad():
        full, _ = model(idx)
        z_full = model.hidden_states(idx)[1]
        caches = [KVCache() for _ in model.transformer.h]
        first, z0 = model.forward_step(idx[:, :7], caches)
        steps = [model.forward_step(idx[:, t : t + 1], caches) for t in range(7, 20)]
    got = torch.cat([first] + [s[0] for s in steps], dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    if z_full is not None:
        torch.testing.assert_close(
            torch.cat([z0] + [s[1] for s in steps], dim=1), z_full, atol=1e-5, rtol=1e-5
        )
    slots = 2 if model.config.interleaved else 1
    assert caches[-1].n == 20 * slots and caches[0].n == 20 * (slots if insert_layer == 0 else 1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_generation_equals_uncached_past_block_size(kind):
    model = tiny(kind)
    idx = prompt(T=5)
    n = 40  # 45 tokens > block_size 32: the window slides for the last 13 steps
    cached = model.generate(idx, n, temperature=0, use_cache=True)
    uncached = model.generate(idx, n, temperature=0, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)
    # (a random pause model reads the same pause vector everywhere and repeats one token)
    if kind != "pause":
        # not a degenerate constant sequence
        assert len(set(uncached[:, 5:].flatten().tolist())) > 2
    # a prompt already longer than the window, and sampling with a seed
    long = prompt(T=40)
    assert torch.equal(
        model.generate(long, 5, temperature=0),
        model.generate(long, 5, temperature=0, use_cache=False),
    )
    torch.manual_seed(3)
    a = model.generate(idx, 30, temperature=1.0, top_k=50)
    torch.manual_seed(3)
    b = model.generate(idx, 30, temperature=1.0, top_k=50, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["plain", "interleave"])
def test_shifted_cache_rebuild(kind):
    """shift > 0 rebuilds the cache from the last block_size - shift tokens: identical to the exact
    path until the window is full, and each later step sees between block_size - shift and
    block_size tokens."""
    model = tiny(kind)
    idx = prompt(T=5)
    exact = model.generate(idx, 50, temperature=0, use_cache=False)
    shifted = model.generate(idx, 50, temperature=0, shift=8)
    assert shifted.shape == exact.shape
    # the token after a full window is still exact
    assert torch.equal(shifted[:, :33], exact[:, :33])
    # reference for the shifted semantics: recompute over the context the rebuild keeps
    ref, bs, s = idx.clone(), 32, 8
    for _ in range(50):
        T = ref.size(1)
        if T > bs:  # the cache was last rebuilt when the context first exceeded the window
            ctx_len = (bs - s) + (T - bs - 1) % (s + 1)
            ctx = ref[:, -ctx_len:]
        else:
            ctx = ref
        logits, _ = model(ctx)
        ref = torch.cat((ref, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(shifted, ref)
    with pytest.raises(ValueError):
        model.generate(idx, 1, shift=32)


def test_kv_cache_grows_without_losing_entries():
    cache = KVCache()
    ks = [
        torch.randn(1, 2, t, 4) for t in (50, 1, 30, 2)
    ]  # crosses the initial capacity of 64 and a doubling
    for k in ks:
        full_k, full_v = cache.update(k, 2 * k)
    torch.testing.assert_close(full_k, torch.cat(ks, dim=2))
    torch.testing.assert_close(full_v, 2 * torch.cat(ks, dim=2))
    assert cache.n == 83


# -----------------------------------------------------------------------------
# steering


@pytest.mark.parametrize("kind", ["interleave", "add", "none"])
def test_steering_scales_only_the_named_concept_logits(kind):
    model = tiny(kind)
    idx = prompt(T=10)
    with torch.no_grad():
        base, _ = model(idx)
        same, _ = model(idx, steer={3: 1.0, 7: 1.0})
        z_base, z_same = model.hidden_states(idx)[1], model.hidden_states(idx, {3: 1.0, 7: 1.0})[1]
    assert torch.equal(same, base) and torch.equal(z_same, z_base)  # factor 1 changes nothing
    # the cached path at the mixing step: forward_step returns the z it mixed in
    with torch.no_grad():
        z, zs_ = (
            model.forward_step(idx, [KVCache() for _ in model.transformer.h], steer)[1]
            for steer in (None, {3: 5.0, 7: -2.0})
        )
    other = [c for c in range(64) if c not in (3, 7)]
    assert torch.equal(zs_[..., other], z[..., other])
    torch.testing.assert_close(zs_[..., 3], 5.0 * z[..., 3])
    torch.testing.assert_close(zs_[..., 7], -2.0 * z[..., 7])
    # and the steered generation is the same cached or not
    steer = {strongest_concept(model, idx): 10.0}
    a = model.generate(idx[:, :4], 36, temperature=0, steer=steer)
    b = model.generate(idx[:, :4], 36, temperature=0, steer=steer, use_cache=False)
    assert torch.equal(a, b)
    if kind != "none":  # with mixing, a strong steer changes the text
        assert not torch.equal(a, model.generate(idx[:, :4], 36, temperature=0))


def test_parse_steer_checks_ids_and_range():
    assert steering.parse_steer(["3:2.5,7:-1", "9:4"], 64, "--steer") == {3: 2.5, 7: -1.0, 9: 4.0}
    for bad in (["64:2"], ["-1:2"], ["3:10.5"], ["3:-11"], ["3"], ["a:b"]):
        with pytest.raises(steering.UsageError):
            steering.parse_steer(bad, 64, "--steer")


class StubSAE:
    """The SAE API sample.py's steering relies on (standardise, encode_pre, topk, decode_sparse,
    check_host, k, n_latents, meta, path)."""

    def __init__(self, d, n_latents, k, layer, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(n_latents, d, generator=g) / d**0.5
        self.W = torch.randn(n_latents, d, generator=g) / d**0.5
        self.b_pre, self.k, self.n_latents, self.d = (
            0.1 * torch.randn(d, generator=g),
            k,
            n_latents,
            d,
        )
        self.meta, self.path = {"layer": layer}, None

    @staticmethod
    def standardise(h):
        mu, std = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
        return (h - mu) / (std + 1e-5), mu, std

    def encode_pre(self, x):
        return (x - self.b_pre) @ self.W_enc.t()

    def topk(self, pre):
        v, i = pre.topk(self.k, dim=-1)
        return torch.relu(v), i

    def decode_sparse(self, values, indices):
        return (values.unsqueeze(-1) * self.W[indices]).sum(-2) + self.b_pre

    def check_host(self, host, layer):
        assert host.config.n_embd == self.d


def saes(layer=1):
    out = [StubSAE(32, 64, 4, layer)]
    try:
        from sae import SAE
    except ImportError:
        return out
    torch.manual_seed(0)
    real = SAE(32, 64, 4, {"layer": layer})
    with torch.no_grad():
        real.pre_bias.normal_(0, 0.1)
    return out + [real]


@pytest.mark.parametrize("sae_i", range(len(saes())))
def test_source_steering_through_the_sae(sae_i):
    sae = saes()[sae_i]
    source = tiny("plain")
    idx = prompt(T=12)
    with torch.no_grad():
        base, _ = source(idx)
        h = source.forward_to(idx, 1)
        x, mu, std = sae.standardise(h)
        pre = sae.encode_pre(x)
        latent = int(pre.argmax(-1)[0, 0])  # active on the first token at least
        with steering.SourceSteering(source, sae, 1, {latent: 1.0}):
            same, _ = source(idx)
        assert torch.equal(same, base)  # factor 1: the hook adds exactly zero
        steer = {latent: -3.0}
        with steering.SourceSteering(source, sae, 1, steer):
            steered, _ = source(idx)
            a = source.generate(idx[:, :4], 36, temperature=0)
            b = source.generate(idx[:, :4], 36, temperature=0, use_cache=False)
        assert torch.equal(a, b)
        # by hand: h + (h_hat with the latent's pre-activation scaled) - h_hat, then the rest of the
        # model
        pre_s = pre.clone()
        pre_s[..., latent] *= -3.0
        dec = lambda p: sae.decode_sparse(*sae.topk(p))
        expected = source.lm_head(source.forward_from(h + (dec(pre_s) - dec(pre)) * std, 1))
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, base)
    assert not source.transformer.h[1]._forward_hooks  # the hook is removed afterwards


# -----------------------------------------------------------------------------
# inspection


def concept_dict(path, n=64):
    entries = [
        {"id": i, "freq": 0.01, "top_tokens": [[f" c{i}x", 5], [f"c{i}y", 2]]} for i in range(n)
    ]
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def test_inspection_names_valid_concepts(tmp_path):
    model = tiny("interleave")
    names = load_concepts(concept_dict(tmp_path / "c.json"))
    ids = prompt(T=10, B=1)[0].tolist() + prompt(T=30, B=1, seed=2)[0].tolist()  # 40 > block_size
    rows = inspect_html.inspect_tokens(model, ids, 10, top=3, names=names)
    assert len(rows) == 40 and [r["prompt"] for r in rows] == [True] * 10 + [False] * 30
    with torch.no_grad():
        z = model.hidden_states(torch.tensor([ids[:32]]))[1][0]
    for r in rows:
        assert len(r["concepts"]) == 3
        for cid, logit, name in r["concepts"]:
            assert 0 <= cid < 64 and name == f"c{cid}x/c{cid}y"
        if r["pos"] < 32:
            assert r["concepts"][0][0] == int(z[r["pos"]].argmax())
    enc = tokenizer()
    text = inspect_html.format_inspection(rows, enc, "t")
    assert len(re.findall(r"\[c(\d+)x/c\1y\]", text)) == 120


def test_html_page_is_self_contained_and_has_the_tokens(tmp_path):
    model = tiny("add", vocab_size=50257)
    enc = tokenizer()
    ids = enc.encode("The cat sat on the <mat> & slept.\nThen")
    rows = inspect_html.inspect_tokens(
        model, ids, 4, top=2, names=load_concepts(concept_dict(tmp_path / "c.json"))
    )
    page = inspect_html.html_page([("a & b", rows), ("again", rows)], enc)
    for tok in ids:
        assert html.escape(enc.decode([tok])) in page
    assert "&lt;" in page and "&amp;" in page and "c" + str(rows[0]["concepts"][0][0]) + "x" in page
    assert "<script src" not in page and "<link" not in page and "http" not in page
    # every token has an anchor (page.html#r1t3 shows its concepts without hovering); a newline
    # token is visible
    anchors = re.findall(r'<span id="(r\d+t\d+)" class="tok', page)
    assert (
        anchors == [f"r{r}t{t}" for r in range(2) for t in range(len(ids))]
        and ":target .tip" in page
    )
    assert page.count("\u21b5</span>\n") == 2
    # the style sheet: every comment closed, and the token and tooltip rules outside comments (a
    # comment once broken across lines hid them, and the page showed no tooltips)
    style = page[page.index("<style>") : page.index("</style>")]
    rules = re.sub(r"/\*.*?\*/", "", style, flags=re.S)
    assert "/*" not in rules and "*/" not in rules and rules.count("{") == rules.count("}")
    for selector in (".tok {", ".tok .tip {", ".tok:hover .tip, .tok:target .tip {"):
        assert selector in rules, selector


@pytest.mark.skipif(
    not any(
        map(
            shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")
        )
    ),
    reason="no headless browser (apt-get install -y chromium)",
)
def test_screenshot_script_renders_the_page(tmp_path):
    out, _ = save_ckpt(tmp_path)
    png = tmp_path / "shot.png"
    p = subprocess.run(
        ["bash", "docs/screenshot.sh", str(out), str(png), "--device=cpu"],
        cwd=ROOT,
        env=dict(ENV, TOKENS="12", HOVER="3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (
        png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and png.stat().st_size > 5000
        and "tooltip on r0t" in p.stdout
    )


# -----------------------------------------------------------------------------
# command line


def save_ckpt(tmp_path, kind="interleave", **kw):
    model = tiny(kind, vocab_size=50257, **kw)
    out = tmp_path / kind
    out.mkdir()
    save_atomic(
        {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config)},
        out / "ckpt.pt",
    )
    return out, model


def test_cli_prints_text(tmp_path):
    out, _ = save_ckpt(tmp_path)
    p = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--out_dir={out}",
            "--start=Once upon a time",
            "--num_samples=2",
            "--max_new_tokens=12",
            "--temperature=0.9",
            "--top_k=40",
            "--seed=7",
            "--device=cpu",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Once upon a time") == 2 and "---------------" in p.stdout


@pytest.mark.parametrize("extra,kept", [([], 32), (["--shift=8"], 24), (["--no_cache"], 32)])
def test_cli_says_when_the_prompt_is_longer_than_the_window(tmp_path, capsys, extra, kept):
    """A prompt past block_size: one line with its length and how many of its last tokens the
    model sees (block_size, or block_size - shift for a cached shifted window); a BOM at the start
    of a prompt file is not a token."""
    out, model = save_ckpt(tmp_path)
    bs = model.config.block_size
    words = " ".join(f"w{i}" for i in range(300))
    n = len(tokenizer().encode(words))
    assert bs == 32 and n > bs
    (tmp_path / "prompt.txt").write_bytes("\ufeff".encode() + words.encode())
    common = [f"--out_dir={out}", "--max_new_tokens=2", "--temperature=0", *extra]
    sample.main(common + ["--start=FILE:" + str(tmp_path / "prompt.txt")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "block_size" in line]
    assert lines == [
        f"# the prompt's {n} tokens are more than block_size={bs}: "
        f"the first {n - kept} are dropped, the model sees the last {kept}"
    ], err
    sample.main(common + ["--start=short"])
    assert "block_size" not in capsys.readouterr().err


def test_cli_cached_and_uncached_agree_and_steering_prints_side_by_side(
    tmp_path, capsys, monkeypatch
):
    out, model = save_ckpt(tmp_path)
    (tmp_path / "prompt.txt").write_text("A story about the sea")
    common = [
        f"--out_dir={out}",
        "--start=FILE:" + str(tmp_path / "prompt.txt"),
        "--max_new_tokens=30",
        "--temperature=0",
    ]
    runs = sample.main(common)
    no_cache = sample.main(common + ["--no_cache"])
    assert runs[0][3] == no_cache[0][3]
    capsys.readouterr()
    # both steerings from one command: the student's concept logit and the source's SAE latent
    source = tiny("plain", seed=5, vocab_size=50257)
    save_atomic(
        {"model": source.state_dict(), "model_args": dataclasses.asdict(source.config)},
        tmp_path / "src.pt",
    )
    monkeypatch.setattr(
        sample.SAE, "load", lambda path, map_location="cpu", layer=None: StubSAE(32, 64, 4, layer=1)
    )
    concept_dict(str(tmp_path / "sae.pt") + ".concepts.json")
    html_path = tmp_path / "page.html"
    c = strongest_concept(model, torch.tensor([tokenizer().encode("A story about the sea")]))
    c2 = (c + 1) % 64
    runs = sample.main(
        common
        + [
            f"--steer={c}:10",
            f"--steer={c2}:-4",
            "--steer_source=2:8",
            f"--concept_source={tmp_path / 'src.pt'}",
            f"--sae_path={tmp_path / 'sae.pt'}",
            "--width=200",
            "--inspect",
            f"--html={html_path}",
        ]
    )
    text = capsys.readouterr().out
    assert [r[0] for r in runs] == [
        "model",
        f"model steered {c}:10,{c2}:-4",
        "concept source",
        "source steered 2:8",
    ]
    header = next(line for line in text.splitlines() if line.startswith("model "))
    # one row, side by side
    assert f"model steered {c}:10,{c2}:-4" in header and "source steered 2:8" in header
    assert runs[1][3] != runs[0][3]
    # inspection of both student runs, names from <sae_path>.concepts.json, the steered one showing
    # concept 3 on top
    assert text.count("== concepts:") == 2 and re.search(r"\[c\d+x/c\d+y\]", text)
    base_part, steered_part = text.split("== concepts: model (")[1].split(
        "== concepts: model steered"
    )
    tops = lambda part: [m.group(1) for m in re.finditer(r"\s(\d+):[+-]\d+\.\d\d", part)]
    # z[..., c] * 10 tops the list
    assert tops(steered_part).count(str(c)) > tops(base_part).count(str(c)) + 5
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "sea" in page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steer=3:11"], "outside [-10, 10]"),
        (["--steer=64:2"], "outside [0, 64)"),
        (["--steer_source=1:2"], "needs --sae_path"),
    ],
)
def test_cli_rejects_bad_steering(tmp_path, capsys, argv, message):
    out, _ = save_ckpt(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={out}", "--max_new_tokens=2"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_steering_and_inspection_without_a_concept_head(tmp_path, capsys):
    out, _ = save_ckpt(tmp_path, "pause")
    for flag in ("--steer=1:2", "--inspect"):
        with pytest.raises(SystemExit):
            sample.main([f"--out_dir={out}", "--max_new_tokens=2", flag])
        assert "concept head" in capsys.readouterr().err


def test_concepts_of_an_openai_sae_are_found_next_to_its_download(tmp_path, monkeypatch):
    """sae.py --describe writes OpenAI's SAE's dictionary next to the downloaded file; sample.py
    looked for 'openai:<location>/<layer>.concepts.json', a file that cannot exist, and named no
    concept."""
    from cocomix import weights

    monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path))
    folder = tmp_path / "openai_sae" / "resid_post_mlp_v5_32k"
    folder.mkdir(parents=True)
    (folder / "5.concepts.json").write_text("[]")
    args = sample.parse_args([])
    assert steering.concepts_path(args, "openai:resid_post_mlp_v5_32k/5") == str(
        folder / "5.concepts.json"
    )
    assert steering.concepts_path(args, "openai:resid_post_mlp_v5_32k/6") == ""


def test_cli_rejects_steering_that_would_change_nothing(tmp_path, capsys):
    """A mix='none' student predicts concepts but never mixes them back: steering them would print a
    'steered' column identical to the unsteered one. And the measurements do not also steer, inspect
    or write HTML: those flags were dropped without a word."""
    out, _ = save_ckpt(tmp_path, "none")
    with pytest.raises(SystemExit):
        sample.main([f"--out_dir={out}", "--max_new_tokens=2", "--steer=1:2"])
    assert "never mixes them back" in capsys.readouterr().err
    out, _ = save_ckpt(tmp_path)
    for flag in ("--steer=1:2", "--inspect", "--html=x.html", "--steer_source=1:2"):
        with pytest.raises(SystemExit):
            steering.main([f"--out_dir={out}", "--max_new_tokens=2", "--measure_steer=1:2", flag])
        assert f"{flag.split('=')[0]} cannot go with --measure_steer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the measurement has its own command now
        sample.main([f"--out_dir={out}", "--measure_steer=1:2"])
    assert "--measure_steer is now python -m scripts.measure_steering" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# measuring steering


def measure_args(*extra):
    return sample.parse_args(
        [
            "--device=cpu",
            "--num_samples=3",
            "--max_new_tokens=12",
            "--temperature=1.0",
            "--top_k=0",
            "--seed=11",
            *extra,
        ]
    )


def sae_reference(source, sae, idx, cid, layer=1):
    """Fraction of tokens per row on which latent cid is active, by one plain forward (rows <=
    block_size)."""
    x, _, _ = sae.standardise(source.forward_to(idx, layer))
    values, indices = sae.topk(sae.encode_pre(x))
    return ((indices == cid) & (values > 0)).any(-1)


def test_windowed_aligns_tokens_and_keeps_half_a_window_of_context():
    idx = torch.arange(3 * 77).view(3, 77)
    # (token, context length)
    seen = lambda w: torch.stack((w, torch.arange(1, w.size(1) + 1).expand_as(w)), -1)
    out = inspect_html.windowed(seen, idx, 32)
    assert torch.equal(out[..., 0], idx)
    ctx = out[0, :, 1]
    assert (
        torch.equal(ctx[:32], torch.arange(1, 33))
        and bool((ctx[32:] >= 17).all())
        and bool((ctx <= 32).all())
    )


def test_measure_steering_counts_what_it_says(tmp_path):
    """Both steerings end to end on tiny models: fractions in [0, 1], n_tokens right, and each
    column equal to a recount from the generated sequences (SAE on the source, dictionary top
    tokens, student TopK)."""
    student, source = tiny("interleave", vocab_size=50257), tiny("plain", seed=5, vocab_size=50257)
    sae, enc, args = StubSAE(32, 64, 4, layer=1), tokenizer(), measure_args()
    prompts = ["The", "Once upon a time"]
    c = strongest_concept(student, torch.tensor([enc.encode("Once upon a time")]))
    # a latent the SAE finds on the prompt, so that scaling it changes the source
    with torch.no_grad():
        x, _, _ = sae.standardise(source.forward_to(torch.tensor([enc.encode("The")]), 1))
        latent = int(sae.encode_pre(x)[0, -1].argmax())
    top_texts = {" the", ",", "."}
    kw = dict(source=source, sae=sae, layer=1, top_texts=top_texts, student=student, enc=enc)
    runs = {
        "student": steering.measure_steering(student, prompts, args, c, steer={c: 10.0}, **kw),
        "source": steering.measure_steering(
            source,
            prompts,
            args,
            latent,
            **kw,
            steer_ctx=lambda: steering.SourceSteering(source, sae, 1, {latent: 8.0}),
        ),
    }
    for name, res in runs.items():
        cid = c if name == "student" else latent
        for cond in ("unsteered", "steered"):
            r = res[cond]
            assert (
                r["n_tokens"] == 2 * 3 * 12
                and len(r["seqs"]) == 6
                and r["prompt"] == [0] * 3 + [1] * 3
            )
            for k in ("sae", "tokens", "student"):
                assert r[k].shape == (6,) and bool(((r[k] >= 0) & (r[k] <= 1)).all())
            n_prompt = [1, len(enc.encode("Once upon a time"))]
            for i, s in enumerate(r["seqs"]):
                new, row = slice(n_prompt[r["prompt"][i]], None), torch.tensor([s])
                assert len(s[new]) == 12
                assert (
                    r["tokens"][i]
                    == sum(inspect_html.token_text(enc, t) in top_texts for t in s[new]) / 12
                )
                assert r["sae"][i] == sae_reference(source, sae, row, cid)[0, new].float().mean()
                steer = {c: 10.0} if name == "student" and cond == "steered" else None
                with torch.no_grad():
                    z = student.hidden_states(row, steer)[1][0, new]
                assert r["student"][i] == (z.topk(4).indices == cid).any(-1).float().mean()
        # the steering did change the text
        assert res["steered"]["seqs"] != res["unsteered"]["seqs"]
    # the unsteered run is the same whichever steering it is paired with (another concept, another
    # factor)
    c2 = (c + 1) % student.config.n_concepts
    other = steering.measure_steering(student, prompts, args, c2, steer={c2: -4.0}, **kw)
    assert other["unsteered"]["seqs"] == runs["student"]["unsteered"]["seqs"]
    text = steering.format_measurement(runs["student"], "t")
    assert text.count("\n") == 4 and "steered - unsteered" in text and "±" in text


def test_factor_one_changes_nothing_with_paired_seeds():
    """Factor 1 on either side: each steered sample is its unsteered twin, token for token, although
    the samples differ from each other (temperature 1, a seed per prompt shared by both conditions).
    """
    student, source = tiny("add", vocab_size=50257), tiny("plain", seed=5, vocab_size=50257)
    sae, args = StubSAE(32, 64, 4, layer=1), measure_args()
    kw = dict(source=source, sae=sae, layer=1, top_texts={" the"}, student=student)
    for gen, steer, ctx in (
        (student, {7: 1.0}, nullcontext),
        (source, None, lambda: steering.SourceSteering(source, sae, 1, {7: 1.0})),
    ):
        res = steering.measure_steering(
            gen, ["The", "It was"], args, 7, steer=steer, steer_ctx=ctx, **kw
        )
        a, b = res["unsteered"], res["steered"]
        assert a["seqs"] == b["seqs"] and len({tuple(s) for s in a["seqs"]}) == 6
        for k in ("sae", "tokens", "student"):
            assert torch.equal(a[k], b[k])
            assert steering.paired_difference(a[k], b[k], a["prompt"]) == (0.0, 0.0)


def test_strong_steer_puts_a_constant_concept_in_every_topk():
    """A concept whose logit is a constant b > 0 (zero row in the concept head) scaled by 10 beats
    every other logit whenever 10 b exceeds their bound |W_i| (|x| + |b_pre|) + |b_i|, |x| < sqrt(d)
    after standardisation: then the steered student puts it in its TopK at every generated token,
    whatever text the steering makes. Unsteered (b a fifth of the bound) it tops the list only
    sometimes."""
    model = tiny("interleave", vocab_size=50257)
    head, c = model.mixer.concept_head, 9
    with torch.no_grad():
        others = torch.arange(64) != c
        bound = (head.weight.norm(dim=1) * (32**0.5 + model.mixer.b_pre.norm()) + head.bias.abs())[
            others
        ].max()
        head.weight[c] = 0
        head.bias[c] = bound / 5
    res = steering.measure_steering(
        model,
        ["The", "She said", "After a while"],
        measure_args(),
        c,
        steer={c: 10.0},
        student=model,
    )
    base, steered = res["unsteered"]["student"], res["steered"]["student"]
    assert bool((steered == 1).all())
    # not vacuous: without the steer the concept is in some TopKs, not all
    assert 0 < base.mean() < 1
    # no SAE, no dictionary given
    assert res["unsteered"]["sae"] is None and res["unsteered"]["tokens"] is None
    d, se = steering.paired_difference(base, steered, res["unsteered"]["prompt"])
    assert abs(d - (1 - base.mean().item())) < 1e-12 and se >= 0


def test_paired_difference_standard_error_is_over_prompts():
    a = torch.zeros(6, dtype=torch.float64)
    b = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.2, 0.2], dtype=torch.float64)
    d, se = steering.paired_difference(a, b, [0, 0, 1, 1, 2, 2])  # per-prompt means 0.2, 0.6, 0.2
    assert (
        abs(d - 2 / 3 * 0.5) < 1e-12
        and abs(se - torch.tensor([0.2, 0.6, 0.2]).std().item() / 3**0.5) < 1e-7
    )
    d1, se1 = steering.paired_difference(a, b, [0] * 6)  # one prompt: over the samples
    assert abs(se1 - b.std().item() / 6**0.5) < 1e-12


def test_cli_measures_from_the_checkpoint_config(tmp_path, capsys, monkeypatch):
    """--measure_steer and --measure_steer_source find the source and SAE in the checkpoint's
    training config, the dictionary next to the SAE, and the prompts in a file; one table each."""
    model = tiny("interleave", vocab_size=50257)
    source = tiny("plain", seed=5, vocab_size=50257)
    save_atomic(
        {"model": source.state_dict(), "model_args": dataclasses.asdict(source.config)},
        tmp_path / "src.pt",
    )
    out = tmp_path / "cocomix"
    out.mkdir()
    config = {
        "concept_source": str(tmp_path / "src.pt"),
        "sae_path": str(tmp_path / "sae.pt"),
        "sae_layer": 1,
    }
    save_atomic(
        {
            "model": model.state_dict(),
            "model_args": dataclasses.asdict(model.config),
            "config": config,
        },
        out / "ckpt.pt",
    )
    concept_dict(str(tmp_path / "sae.pt") + ".concepts.json")
    monkeypatch.setattr(
        sample.SAE, "load", lambda path, map_location="cpu", layer=None: StubSAE(32, 64, 4, layer=1)
    )
    (tmp_path / "prompts.txt").write_text("\nFirst line here\n\nSecond line\nThird line\n")
    res = steering.main(
        [
            f"--out_dir={out}",
            "--measure_steer=3:8",
            "--measure_steer_source=3:-2",
            "--num_samples=2",
            "--max_new_tokens=6",
            f"--prompts={tmp_path / 'prompts.txt'}",
            "--n_prompts=2",
        ]
    )
    text = capsys.readouterr().out
    assert set(res) == {"--measure_steer", "--measure_steer_source"}
    assert (
        text.count("== concept 3 [c3x/c3y] x8 on the student's") == 1
        and "x-2 on the concept source's" in text
    )
    for r in res.values():
        assert r["steered"]["n_tokens"] == 2 * 2 * 6 and r["steered"]["prompt"] == [0, 0, 1, 1]
        assert all(s[:3] == tokenizer().encode("First line here") for s in r["steered"]["seqs"][:2])
    for argv, message in (
        (["--measure_steer=3:11"], "outside [-10, 10]"),
        (["--measure_steer=3:2,4:2"], "one ID:FACTOR"),
    ):
        with pytest.raises(SystemExit):
            steering.main([f"--out_dir={out}", "--max_new_tokens=2"] + argv)
        assert message in capsys.readouterr().err
