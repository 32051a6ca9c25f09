"""Shared by the atheris harnesses: paths, the world they fuzz against, and the one-line-error check.

Imports nothing from branchy_tee: each harness imports it under ``atheris.instrument_imports``.
The world (a sealed LeNet-5 with keys, a request and a result) is built once by ``fuzz/run.py``
into ``$FUZZ_WORLD`` (default fuzz/out/world).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
for p in (str(REPO / "tests"), str(REPO / "tests" / "security")):
    if p not in sys.path:
        sys.path.insert(0, p)

WORLD = Path(os.environ.get("FUZZ_WORLD", FUZZ / "out" / "world"))
SCRATCH = Path(os.environ.get("FUZZ_SCRATCH", "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"))


def world_paths() -> dict[str, Path]:
    return {
        "bundle": WORLD / "model.btee",
        "mo.key": WORLD / "mo.key",
        "do1.key": WORLD / "do1.key",
        "request": WORLD / "do1.req",
        "result": WORLD / "reference" / "do1.res",
    }


def read_key(name: str) -> bytes:
    return (WORLD / name).read_bytes()


class Finding(Exception):
    """Raised by a harness when a declared error breaks its contract (e.g. a multi-line message)."""


def one_line(e: BaseException) -> None:
    msg = str(e)
    if not msg.strip() or "\n" in msg:
        raise Finding(f"{type(e).__name__} message is not one line: {msg[:300]!r}")
