"""Session fixtures that several test files use, built once per run: a prepared text (data_dir) and
a briefly trained concept source with an SAE on it (source_and_sae). Their helpers are in
tests/fixtures.py."""

import os

import numpy as np
import pytest
import torch

from tests.fixtures import TINY, run


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """TinyShakespeare from the data folder in $COCOMIX_DATA (what .ci/run sets) when it is there,
    else a generated text."""
    from prepare import prepare

    out = tmp_path_factory.mktemp("data")
    src = os.path.join(os.environ.get("COCOMIX_DATA", ""), "tinyshakespeare", "input.txt")
    if not os.path.exists(src):
        src = str(out / "text.txt")
        rng = np.random.default_rng(0)
        words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
        with open(src, "w") as f:
            f.write(" ".join(rng.choice(words, 200_000)))
    prepare([src], str(out / "prepared"), verbose=False)
    return str(out / "prepared")


@pytest.fixture(scope="session")
def source_and_sae(data_dir, tmp_path_factory):
    """A concept source trained briefly by train.py and an SAE on its layer 1 (random init is
    enough for the plumbing; the SAE tests check SAE training)."""
    from sae import SAE

    out = str(tmp_path_factory.mktemp("source"))
    run(
        "train.py",
        f"--data_dir={data_dir}",
        f"--out_dir={out}",
        "--max_iters=10",
        "--eval_interval=10",
        *TINY,
    )
    torch.manual_seed(0)
    sae = SAE(32, 128, 8, meta={"layer": 1})
    sae.save(os.path.join(out, "sae.pt"))
    return os.path.join(out, "ckpt.pt"), os.path.join(out, "sae.pt")
