"""Shared test fixtures: where the shared test data lives, and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SGX_QUOTES = SHARED / "testdata" / "sgx-quotes"


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
    from branchy_tee.enclave.env import ensure_env

    return ensure_env(REPO / ".enclave-env")

