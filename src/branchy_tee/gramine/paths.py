"""Checks on the host paths a build measures: what the manifest may name, and which folders a
host-backed data folder must never be mounted at."""

from __future__ import annotations

import os
import re
from pathlib import Path

from branchy_tee.core.errors import UsageError
from branchy_tee.tee import measured

BAD_PATH = re.compile(r"[\"'\\$:\x00-\x1f\x7f]")


def abs_path(path: str, what: str) -> str:
    p = os.path.abspath(os.path.expanduser(path))
    if BAD_PATH.search(p):
        raise UsageError(
            f"{what} {p!r}: quotes, backslashes, '$', ':' and control characters are not supported in enclave paths"
        )
    return p


def overlaps(a: str, b: str) -> bool:
    pa, pb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return pa == pb or pa in pb.parents or pb in pa.parents


# Folders a host-backed data folder must not be, contain or (the last three) lie in: /tmp and the
# secrets tmpfs are enclave memory (a mount at or above them would hand them to the host), and
# Gramine's own pseudo-filesystems are not the host's to replace.
_ENCLAVE_MEMORY = ("/tmp", measured.SECRETS_DIR)
_PSEUDO = ("/dev", "/proc", "/sys")


def check_data_dir(d: str) -> None:
    real = Path(os.path.realpath(d))
    for t in map(Path, (*_ENCLAVE_MEMORY, *_PSEUDO)):
        if real == t or real in t.parents:
            what = (
                f"the enclave's in-memory {t} (where serve keeps its TLS key)"
                if str(t) in _ENCLAVE_MEMORY
                else f"Gramine's {t}"
            )
            raise UsageError(f"{d} would mount a host folder over {what}: give a folder below /tmp, or elsewhere")
        if str(t) in _PSEUDO and t in real.parents:
            raise UsageError(f"{d} is inside Gramine's {t}: give a host folder for data")
