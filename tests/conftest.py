"""Shared test fixtures: where the shared test data lives, and small helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SGX_QUOTES = SHARED / "testdata" / "sgx-quotes"


def pytest_collection_modifyitems(items):
    """Every test that needs the enclave environment is an ``enclave`` test (see pyproject's markers)."""
    for item in items:
        if "enclave_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.enclave)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def sgx_quotes_dir() -> Path:
    if not (SGX_QUOTES / "phala-1.quote.bin").is_file():
        pytest.skip(f"real SGX quotes not found in {SGX_QUOTES} (the shared test data sits beside the repo)")
    return SGX_QUOTES


@pytest.fixture(scope="session")
def enclave_env():
    """The enclave's Python environment, made once: REPO/.enclave-env, the one `make enclave-env` and
    `branchy-tee enclave build` use, so later test runs reuse it (about 30 s to make)."""
    from branchy_tee.gramine.env import ensure_env

    return ensure_env(REPO / ".enclave-env")


@pytest.fixture(scope="session")
def sealed(tmp_path_factory):
    """A sealed LeNet-5 (1x28x28, 3 exits); keys; images for an encrypted request of 5 samples (the
    enclave tests).

    The run directory is written directly (random weights) instead of by a training run: packaging
    does not care what the weights are, and this keeps the file well under its time budget."""
    from branchy_tee.cli import main
    from branchy_tee.models import create_model
    from branchy_tee.models.card import ModelCard
    from branchy_tee.models.rundir import write_model_card, write_weights
    from branchy_tee.tee.criteria import ENTROPY
    from branchy_tee.tee.sealed.preprocessing import Preprocessing

    base = tmp_path_factory.mktemp("sealed")
    model = create_model("lenet5", num_classes=10, in_channels=1).eval()
    (base / "run").mkdir()
    write_weights(base / "run" / "model.safetensors", model)
    write_model_card(
        base / "run",
        ModelCard(
            arch="lenet5",
            config={"num_classes": 10, "in_channels": 1},
            classes=tuple(f"class-{i}" for i in range(10)),
            dataset="synthetic",
            preprocessing=Preprocessing.for_images((1, 28, 28), [0.5], [0.3]),
            criterion=ENTROPY,
            thresholds=(0.5, 0.5),
            stage_flops=(235200, 480000, 96000),
            head_flops=(16384, 26624, 21840),
        ),
    )
    (base / "keys").mkdir()
    assert main(["keygen", "--out", str(base / "keys" / "model.key")]) == 0
    assert main(["keygen", "--out", str(base / "keys" / "data.key")]) == 0
    assert (
        main(["seal", str(base / "run"), "--key", str(base / "keys" / "model.key"), "--out", str(base / "model.btee")])
        == 0
    )
    np.save(base / "images.npy", np.random.RandomState(0).randint(0, 256, (5, 1, 28, 28)).astype(np.uint8))
    return base
