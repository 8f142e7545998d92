"""Tests for sae.py and sae_train.py: the SAE equations of docs/method.md, OpenAI's file format,
sparse decoding, AuxK, files, the command line and exact resumes."""

import collections
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch

import cocomix.sae_train as sae_train
from cocomix.dictionary import concept_name, load_concepts
from cocomix.sae_train import ShuffleBuffer, evaluate_sae, train_sae
from model import GPT, GPTConfig
from sae import SAE, main
from tests.fixtures import write_meta

# tiktoken's gpt2 files: where TIKTOKEN_CACHE_DIR says (.ci/run sets it), else beside the checkout
TIKTOKEN_DIR = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tiktoken"
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: waking a second thread costs more than it saves, badly so on a busy
    machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spec_reference(h, W_enc, W_dec, b_pre, b_lat, k, eps=1e-5):
    """docs/method.md's SAE equations written out with dense matrices: returns the dense latents a
    and h_hat."""
    mu = h.mean(-1, keepdim=True)
    std = ((h - mu) ** 2).sum(-1, keepdim=True).div(h.size(-1) - 1).sqrt()  # Bessel
    x = (h - mu) / (std + eps)
    pre = (x - b_pre) @ W_enc.T + b_lat
    top = pre.topk(k, dim=-1)
    a = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
    x_hat = a @ W_dec.T + b_pre
    return a, x_hat * std + mu


def dense_latents(values, indices, C):
    return torch.zeros(*values.shape[:-1], C, dtype=values.dtype).scatter(-1, indices, values)


def openai_state_dict(d=24, C=96, k=6, k_as_tensor=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    sd["pre_bias"] = torch.randn(d, generator=g) * 0.1
    sd["latent_bias"] = torch.randn(C, generator=g) * 0.1
    sd["encoder.weight"] = torch.randn(C, d, generator=g) / d**0.5
    # deliberately not unit norm: loading must not touch it
    sd["decoder.weight"] = torch.randn(d, C, generator=g) * 0.3
    sd["stats_last_nonzero"] = torch.randint(0, 100, (C,), generator=g)
    sd["latents_activation_frequency"] = torch.rand(C, generator=g)
    sd["latents_mean_square"] = torch.rand(C, generator=g)
    sd["activation"] = "TopK"
    sd["activation_state_dict"] = {"k": torch.tensor(k) if k_as_tensor else k, "postact_fn": "ReLU"}
    return sd


@pytest.mark.parametrize("k_as_tensor", [False, True])
def test_openai_format_matches_spec_formulas(tmp_path, k_as_tensor):
    sd = openai_state_dict(k_as_tensor=k_as_tensor)
    path = str(tmp_path / "5.pt")
    torch.save(sd, path)
    sae = SAE.load(path)
    assert (sae.d, sae.n_latents, sae.k) == (24, 96, 6) and sae.meta["layer"] is None
    assert torch.equal(sae.decoder.weight, sd["decoder.weight"]) and torch.equal(
        sae.W_dec_T, sd["decoder.weight"].t()
    )
    h = torch.randn(3, 5, 24) * 4 + 2
    a_ref, h_hat_ref = spec_reference(
        h, sd["encoder.weight"], sd["decoder.weight"], sd["pre_bias"], sd["latent_bias"], 6
    )
    with torch.no_grad():
        h_hat, values, indices = sae(h)
        _, _, mu, std, pre = sae.encode(h, return_pre=True)
    assert values.shape == indices.shape == (3, 5, 6)
    torch.testing.assert_close(dense_latents(values, indices, 96), a_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_hat, h_hat_ref, atol=1e-4, rtol=1e-5)
    # the layer comes from the caller for OpenAI files
    assert SAE.load(path, layer=5).meta["layer"] == 5


def test_openai_non_topk_is_refused(tmp_path):
    sd = openai_state_dict()
    sd["activation"] = "ReLU"
    path = str(tmp_path / "relu.pt")
    torch.save(sd, path)
    with pytest.raises(ValueError, match="TopK"):
        SAE.load(path)


def test_openai_name_sets_the_layer_and_refuses_another(tmp_path, monkeypatch):
    """'openai:<location>/<layer>' names the layer the SAE was trained on: that layer is recorded,
    and a different layer asked for (e.g. --sae_layer=3 with .../5) is an error, not a silent
    mismatch."""
    from cocomix import weights

    monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path))  # a cached copy: no download
    os.makedirs(tmp_path / "openai_sae" / "loc")
    torch.save(openai_state_dict(), str(tmp_path / "openai_sae" / "loc" / "5.pt"))
    for layer in (None, 5):
        sae = SAE.load("openai:loc/5", layer=layer)
        assert sae.meta["layer"] == 5 and sae.meta["host"] == "gpt2"
    with pytest.raises(ValueError, match="layer 5, but layer=3"):
        SAE.load("openai:loc/5", layer=3)


def test_sparse_decode_equals_dense_with_gradients():
    torch.manual_seed(0)
    sae = SAE(12, 40, 5).double()
    with torch.no_grad():
        sae.pre_bias.normal_()
    x = torch.randn(7, 12, dtype=torch.float64)
    values, indices = sae.topk(sae.encode_pre(x))
    values = (values.detach() + torch.rand_like(values)).requires_grad_(True)  # non-zero everywhere
    r = torch.randn(7, 12, dtype=torch.float64)

    (sae.decode_sparse(values, indices) * r).sum().backward()
    sparse_grads = values.grad.clone(), sae.decoder.weight.grad.clone(), sae.pre_bias.grad.clone()
    values.grad = None
    sae.zero_grad()
    x_dense = dense_latents(values, indices, 40) @ sae.decoder.weight.T + sae.pre_bias
    (x_dense * r).sum().backward()
    dense_grads = values.grad, sae.decoder.weight.grad, sae.pre_bias.grad

    torch.testing.assert_close(sae.decode_sparse(values, indices), x_dense, atol=1e-12, rtol=1e-12)
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, atol=1e-12, rtol=1e-12)


def synthetic(n, features, gen):
    """Standardised sums of 3 random ground-truth directions with positive weights, plus a little
    noise."""
    idx = torch.randint(len(features), (n, 3), generator=gen)
    coef = torch.rand(n, 3, generator=gen) + 0.5
    h = (coef[..., None] * features[idx]).sum(1) + 0.05 * torch.randn(
        n, features.size(1), generator=gen
    )
    return SAE.standardise(h)[0]


def dead_fraction(sae, x):
    with torch.no_grad():
        values, indices = sae.topk(sae.encode_pre(x))
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    fired[indices[values > 0]] = True
    return 1.0 - fired.float().mean().item()


def test_auxk_revives_dead_latents():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    held_out = synthetic(8192, features, g)

    def stream():
        gen = torch.Generator().manual_seed(1)
        while True:
            yield synthetic(256, features, gen)

    dead = {}
    for aux_coef in (1 / 32, 0.0):
        torch.manual_seed(0)
        sae = SAE(16, 128, 4)
        with torch.no_grad():  # 96 of 128 latents can never reach the top 4: dead from the start
            sae.latent_bias[32:] = -2.5
        assert dead_fraction(sae, held_out) > 0.7
        m = train_sae(sae, stream(), 100, 1e-2, dead_tokens=1024, aux_coef=aux_coef, progress=False)
        assert m["fvu"] < 0.6
        dead[aux_coef] = dead_fraction(sae, held_out)
        norms = sae.decoder.weight.norm(dim=0)
        torch.testing.assert_close(norms, torch.ones_like(norms))  # unit columns after every step
    assert dead[1 / 32] < 0.2, dead
    assert dead[0.0] > 0.6, dead  # without AuxK nothing gives a dead latent a gradient


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    meta = {
        "host": "/x/ckpt.pt",
        "host_sha256": "ab" * 32,
        "layer": 3,
        "d": 20,
        "train": {"lr": 1e-3, "k_aux": None},
    }
    sae = SAE(20, 64, 8, meta)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / "sub" / "sae.pt")
    sae.save(path)
    assert not os.path.exists(path + ".tmp")
    back = SAE.load(path)
    assert (back.d, back.n_latents, back.k, back.meta) == (20, 64, 8, meta)
    h = torch.randn(4, 9, 20)
    with torch.no_grad():
        for a, b in zip(sae(h), back(h)):
            assert torch.equal(a, b)


def test_check_host_mismatch():
    sae = SAE(32, 64, 4, {"layer": 2})
    sae.path = "x.pt"
    sae.check_host(GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=16), 2)
    sae.check_host({"n_embd": 32}, 2)
    with pytest.raises(
        ValueError,
        match=r"SAE x.pt was trained on layer 2 of a d=32 "
        r"model; the concept source has d=64 at layer 2",
    ):
        sae.check_host(GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=16), 2)
    with pytest.raises(ValueError, match=r"layer 2 .* at layer 3"):
        sae.check_host(
            GPT(GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=64)), 3
        )
    unknown = SAE(32, 64, 4)  # an OpenAI file: layer unknown, only the width is checked
    unknown.check_host({"n_embd": 32}, 7)
    with pytest.raises(ValueError, match=r"d=32 model \(layer unknown\)"):
        unknown.check_host({"n_embd": 48}, 7)


def test_bad_files_raise_value_error_with_path(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    good = str(tmp_path / "good.pt")
    SAE(8, 16, 2).save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:600])
    foreign = str(tmp_path / "ckpt.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {}}, foreign)
    wrong_shape = str(tmp_path / "shape.pt")
    sd = openai_state_dict()
    sd["decoder.weight"] = sd["decoder.weight"][:, :10]
    torch.save(sd, wrong_shape)
    for path in (str(garbage), str(truncated), foreign, wrong_shape):
        with pytest.raises(ValueError, match=path.replace(".", r"\.")):
            SAE.load(path)


def test_shuffle_buffer_mixes_refills_and_resumes():
    chunk = lambda c: torch.arange(16 * c, 16 * c + 16, dtype=torch.float32)[
        :, None
    ]  # consecutive ids, like one window
    buf = ShuffleBuffer(chunk, 16, 64, 8, torch.Generator().manual_seed(0))
    first_round = torch.cat([next(buf) for _ in range(4)]).flatten()
    assert len(first_round.unique()) == 32 and first_round.max() < 64  # half the pool, no repeats
    assert not torch.equal(first_round[:8].sort().values, torch.arange(8.0))  # not in stream order
    later = torch.cat([next(buf) for _ in range(37)]).flatten()
    assert later.max() >= 64 * 4  # refilled from the stream as it is served
    # the state is row numbers: a buffer rebuilt from it recomputes the pool and serves the same
    # batches
    calls = []
    back = ShuffleBuffer(
        lambda c: calls.append(c) or chunk(c), 16, 64, 8, torch.Generator(), buf.state_dict()
    )
    assert torch.equal(back.pool, buf.pool) and calls == sorted(set(calls))  # one pass per chunk
    for _ in range(30):
        assert torch.equal(next(back), next(buf))


def write_tokens(path, n, vocab, seed):
    np.random.default_rng(seed).integers(0, vocab, n, dtype=np.uint16).tofile(path)


def tiny_host_and_data(tmp_path, monkeypatch):
    """A 2-layer GPT checkpoint and random token files; returns (host, data dir, sae.py flags up to
    --sae_path)."""
    # training ends by writing the concept dictionary, which needs tiktoken's gpt2 files
    if not os.path.isdir(TIKTOKEN_DIR):
        pytest.skip("no tiktoken cache for gpt2")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_DIR)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    host = GPT(cfg)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save({"model": host.state_dict(), "model_args": dataclasses.asdict(cfg)}, ckpt)
    data = tmp_path / "data"
    data.mkdir()
    write_tokens(data / "train.bin", 20000, 2000, 0)
    write_tokens(data / "val.bin", 3000, 2000, 1)
    write_meta(data)
    return (
        host,
        data,
        [
            f"--concept_source={ckpt}",
            f"--data_dir={data}",
            "--layer=0",
            "--n_latents=128",
            "--k=8",
            "--tokens=8192",
            "--batch_size=512",
            "--buffer=2048",
            "--eval_tokens=1024",
        ],
    )


def test_cli_train_eval_describe(tmp_path, monkeypatch):
    host, data, args = tiny_host_and_data(tmp_path, monkeypatch)
    out = str(tmp_path / "sae" / "sae.pt")
    main(args + [f"--sae_path={out}"])
    # removed once the SAE is written
    assert not os.path.exists(str(tmp_path / "sae" / "sae.resume.pt"))
    sae = SAE.load(out)
    assert sae.meta["layer"] == 0 and sae.meta["d"] == 32 and len(sae.meta["host_sha256"]) == 64
    m = sae.meta["eval"]
    assert 0 < m["fvu"] < 1.0 and 0 < m["l0"] <= 8 and 0 <= m["dead"] <= 1 and m["tokens"] == 1024
    # the clean loss is the host's own next-token loss on the same windows
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    idx = val[: 32 * 32 + 1]
    x, y = idx[:-1].view(32, 32), torch.stack([idx[i * 32 + 1 : i * 32 + 33] for i in range(32)])
    with torch.no_grad():
        _, loss = host(x, y)
    assert abs(m["ce"] - loss.item()) < 1e-4 and abs(m["delta_ce"] - (m["ce_sae"] - m["ce"])) < 1e-9
    lines = [json.loads(l) for l in open(str(tmp_path / "sae" / "sae.metrics.jsonl"))]
    assert "settings" in lines[0] and "eval" in lines[-1] and lines[-2]["step"] == 15
    # the dictionary of this very SAE
    by_id = load_concepts(str(tmp_path / "sae" / "sae.concepts.json"), out)
    other = str(tmp_path / "other_sae.pt")
    SAE(32, 128, 8, {"layer": 0}).save(other)
    # e.g. one left from an earlier SAE at that path
    with pytest.raises(ValueError, match="describes another SAE"):
        load_concepts(str(tmp_path / "sae" / "sae.concepts.json"), other)
    concepts = list(by_id.values())
    assert list(by_id) == [c["id"] for c in concepts] == list(range(128))
    live = [c for c in concepts if c["freq"] > 0]
    assert live and all(
        len(c["examples"]) <= 10 and "[[" in c["examples"][0]["context"] for c in live
    )
    # each token fires l0 latents on average
    assert abs(sum(c["freq"] for c in concepts) - m["l0"]) < 1e-6
    assert all(isinstance(concept_name(c), str) and concept_name(c) for c in concepts)
    # and the stored SAE re-evaluates to the same numbers
    again = evaluate_sae(sae, host.eval(), 0, str(data), tokens=1024, block_size=32)
    assert abs(again["fvu"] - m["fvu"]) < 1e-6


def test_cli_eval_only_uses_the_windows_it_was_trained_on(tmp_path, monkeypatch, capsys):
    """--eval_only re-evaluates an SAE on windows of the block_size it was trained with (recorded in
    its meta), so it gives its stored numbers back; it used the host's block_size, a different FVU.
    """
    _, data, args = tiny_host_and_data(tmp_path, monkeypatch)
    out = str(tmp_path / "sae16.pt")
    main(args + ["--block_size=16", f"--sae_path={out}"])
    stored = SAE.load(out).meta["eval"]
    capsys.readouterr()
    main([f"--sae_path={out}", f"--data_dir={data}", "--eval_only", "--eval_tokens=1024"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        again["fvu"] == pytest.approx(stored["fvu"], rel=1e-6)
        and again["tokens"] == stored["tokens"]
    )


def step_records(path):
    """{step: metrics without the wall time} from a metrics log; a step logged twice (after a resume
    from an earlier save) must have been logged identically."""
    records = {}
    for r in map(json.loads, open(path)):
        if "step" in r:
            r.pop("time")
            assert records.setdefault(r["step"], r) == r
    return records


def run_interrupted(args, monkeypatch, how, at):
    """main(args), stopped in step `at` by a SIGINT (saves after that step) or a crash (nothing
    saved then)."""
    calls, sae_loss = [], sae_train.sae_loss

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == at + 1 and how == "crash":
            raise RuntimeError("simulated crash")
        if len(calls) == at + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return sae_loss(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(sae_train, "sae_loss", interrupted)
        if how == "crash":
            with pytest.raises(RuntimeError, match="simulated"):
                main(args)
        else:  # stopped: what it had saved, and a shell's status for Ctrl-C
            with pytest.raises(SystemExit) as e:
                main(args)
            assert e.value.code == 130


@pytest.mark.parametrize("how", ["signal", "crash"])
def test_resume_is_exact(tmp_path, monkeypatch, how):
    """Stopped by SIGINT or by a crash (the last periodic save survives), then rerun with the same
    command: the same per-step losses and bitwise the same SAE as one uninterrupted run."""
    _, _, args = tiny_host_and_data(tmp_path, monkeypatch)
    # chunks of one window (32 rows) and a refill every 2 steps: by step 20 the pool holds only some
    # chunks, so the rebuild must recompute chunks by number; with 512 latents some die, so the AuxK
    # counters matter
    args += [
        "--host_batch=1",
        "--buffer=1024",
        "--batch_size=256",
        "--n_latents=512",
        "--dead_tokens=512",
        "--log_interval=1",
        "--ckpt_interval=8",
    ]
    main(args + [f"--sae_path={tmp_path / 'ref' / 'sae.pt'}"])
    out, resume_path = tmp_path / "cut" / "sae.pt", tmp_path / "cut" / "sae.resume.pt"
    run_interrupted(args + [f"--sae_path={out}"], monkeypatch, how, at=20)
    resume = torch.load(str(resume_path), weights_only=True)
    assert resume["train"]["step"] == (16 if how == "crash" else 21) and not out.exists()
    held = (resume["buffer"]["ids"] // 32).unique()
    # the oldest chunks are gone from the pool
    assert len(held) < resume["buffer"]["next"] // 32 and held.min() > 0
    main(args + [f"--sae_path={out}"])
    assert not resume_path.exists()
    ref, cut = (
        step_records(tmp_path / "ref" / "sae.metrics.jsonl"),
        step_records(tmp_path / "cut" / "sae.metrics.jsonl"),
    )
    assert list(ref) == list(range(32)) and ref == cut
    assert any(r["dead"] > 0 and r["auxk"] > 0 for s, r in ref.items() if s > 16)
    a, b = SAE.load(str(tmp_path / "ref" / "sae.pt")), SAE.load(str(out))
    assert a.meta["eval"] == b.meta["eval"] and a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    _, _, args = tiny_host_and_data(tmp_path, monkeypatch)
    args.append(f"--sae_path={tmp_path / 'sae' / 'sae.pt'}")
    run_interrupted(args, monkeypatch, "signal", at=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    assert "sae.resume.pt" in before and "sae.pt" not in before
    for flag, message in (
        ("--n_latents=64", "n_latents=64 (resume file: 128)"),
        ("--k=4", "k=4 (resume file: 8)"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args + [flag])
        assert (
            e.value.code.startswith("error: ")
            and message in e.value.code
            and "\n" not in e.value.code
        )
        assert {
            p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()
        } == before  # nothing written
