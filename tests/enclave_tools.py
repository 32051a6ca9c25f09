"""Gramine's own manifest tooling (../shared/gramine-tools) for the enclave tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRAMINE_TOOLS = REPO.parent / "shared" / "gramine-tools"
SUPPORTED_GRAMINE = ("1.8", "1.9")  # the releases the enclave supports; 1.7 is refused
ENCLAVE_ENV = REPO / ".enclave-env"  # the enclave_env fixture's (conftest.py)


def gramine_release(release: str) -> Path:
    """Gramine's own manifest tooling of one release (../shared/gramine-tools/vX.Y), or skip."""
    tool = GRAMINE_TOOLS / f"v{release}" / "gramine-manifest"
    if not tool.is_file():
        pytest.skip(
            f"Gramine {release}'s gramine-manifest not found in {GRAMINE_TOOLS} (the shared tools sit beside the repo)"
        )
    return tool.parent


def install_gramine_manifest(bindir: Path, release: str, log: Path | None = None) -> Path:
    """Put Gramine's real gramine-manifest of ``release`` on ``bindir`` (a wrapper that runs it from
    ../shared with this interpreter, which has its Python dependencies); with ``log``, each call's
    arguments and folder are recorded there as a JSON line first."""
    tools = gramine_release(release)
    bindir.mkdir(parents=True, exist_ok=True)
    wrapper = bindir / "gramine-manifest"
    wrapper.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        + (
            f"with open({str(log)!r}, 'a') as f:\n"
            "    f.write(json.dumps({'tool': 'gramine-manifest', 'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')\n"
            if log
            else ""
        )
        + f"os.environ['PYTHONPATH'] = {str(tools)!r}\n"
        + f"os.execv(sys.executable, [sys.executable, {str(tools / 'gramine-manifest')!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(0o755)
    return wrapper


def encrypt_sealed_images(sealed: Path, out: Path, request_id: str | None = None) -> int:
    """The data owner's request for the ``sealed`` fixture's images (``encrypt-input``, optionally
    ``--request-id ID``); the command's exit status."""
    from branchy_tee.cli import main

    args = ["--request-id", request_id] if request_id else []
    key = sealed / "keys" / "data.key"
    return main(
        [
            "encrypt-input",
            str(sealed / "images.npy"),
            "--bundle",
            str(sealed / "model.btee"),
            "--key",
            str(key),
            "--out",
            str(out),
            *args,
        ]
    )
