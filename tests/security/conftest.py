"""Fixtures of the security suite. tests/ (for ``runs``), this directory (for ``world``) and fuzz/
(the `make fuzz` scripts whose helpers the tests share) are put on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE), str(HERE.parents[1] / "fuzz")):
    if p not in sys.path:
        sys.path.insert(0, p)

from world import World, build_world, quiet_call  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """One sealed LeNet-5, keys for a model owner and two data owners, requests and results (read-only:
    copy a file before changing it)."""
    w, _, _ = quiet_call(build_world, tmp_path_factory.mktemp("world"))
    return w


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    """The simulated provider's dev key lives under XDG_CONFIG_HOME: keep it out of the real home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"
