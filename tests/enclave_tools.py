"""Gramine's own manifest tooling (../shared/gramine-tools) for the enclave tests."""

from __future__ import annotations

import os
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


SHARED_GRAMINE = REPO.parent / "shared" / "gramine" / "v1.9"


def gramine_direct(cache: Path) -> Path:
    """The bin/ folder of a real Gramine with gramine-direct: PATH's, else ../shared/gramine/v1.9; or skip.

    A copy of ../shared whose symbolic links were flattened into small files naming their targets
    (direct/loader -> libpal.so: gramine-direct then fails with "Permission denied") is copied once to
    ``cache`` with those links restored; Gramine's own files are used unchanged."""
    import shutil

    on_path = shutil.which("gramine-direct")
    if on_path:
        return Path(on_path).resolve().parent
    loader = SHARED_GRAMINE / "lib" / "x86_64-linux-gnu" / "gramine" / "direct" / "loader"
    if not (SHARED_GRAMINE / "bin" / "gramine-direct").is_file() or not loader.exists():
        pytest.skip(f"no gramine-direct on PATH and no Gramine 1.9 in {SHARED_GRAMINE}")
    if loader.is_symlink() or os.access(loader, os.X_OK):
        return SHARED_GRAMINE / "bin"
    fixed = cache / "gramine-v1.9"
    if not fixed.is_dir():
        tmp = cache / "gramine-v1.9.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(SHARED_GRAMINE, tmp)
        for d in [tmp, *tmp.rglob("*")]:
            if d.is_dir():
                d.chmod(d.stat().st_mode | 0o200)  # (the shared tree is read-only)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size < 256:
                target = f.read_bytes()
                name = target.decode(errors="replace")
                if b"\n" not in target and "\0" not in name and (f.parent / name).exists():
                    f.unlink()
                    f.symlink_to(name)
        tmp.rename(fixed)
    return fixed / "bin"
