"""What the demo's acts share: the data owners' names, step headings, ports, the enclave's command line."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from branchy_tee.gramine.launch import LaunchBackend

OWNERS = ("do-a", "do-b")
TOTAL_STEPS = 8


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, who: str, what: str) -> None:
    say(f"\n[{n}/{TOTAL_STEPS}] {who}: {what}")


def enclave_run(build_dir: Path, *command: str, backend: str = LaunchBackend.NATIVE) -> list[str]:
    """The host's command line that runs ``command`` in the enclave built in ``build_dir`` (natively
    by default: no SGX here)."""
    return [
        sys.executable,
        "-m",
        "branchy_tee.cli",
        "enclave",
        "run",
        "--backend",
        backend,
        str(build_dir),
        "--",
        *command,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
