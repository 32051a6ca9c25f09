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
