"""Gramine's file names and command-line tools, as the build and the launcher use them: the
manifest's rendering and signing commands (exactly as the build folder's Makefile runs them), and
reading MRENCLAVE/MRSIGNER back from a SIGSTRUCT."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import tomllib

from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.gramine import MANIFEST_NAME

MANIFEST_TEMPLATE = f"{MANIFEST_NAME}.manifest.template"
MANIFEST = f"{MANIFEST_NAME}.manifest"
SGX_MANIFEST = f"{MANIFEST_NAME}.manifest.sgx"
SIGSTRUCT = f"{MANIFEST_NAME}.sig"
SUPPORTED_GRAMINE = "1.8 or later"
INSTALL_HINT = (
    "install Gramine from its apt repository (https://gramine.readthedocs.io/en/stable/installation.html; "
    "on Ubuntu: add packages.gramineproject.io, then `sudo apt install gramine`)"
)


def which(tool: str) -> str | None:
    return shutil.which(tool)


def use_gramine(where: str | None) -> None:
    """Put the Gramine installation ``where`` (its prefix or its bin/ folder) first on PATH, for this
    process and the tools it starts; with None, the tools already on PATH are used."""
    if where is None:
        return
    base = Path(where).resolve()
    bindir = base / "bin" if (base / "bin").is_dir() else base
    if not any((bindir / t).is_file() for t in ("gramine-direct", "gramine-manifest", "gramine-sgx")):
        raise UsageError(
            f"--gramine {where}: no Gramine there (expected gramine-direct or gramine-manifest in it or in its bin/)"
        )
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def run_tool(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run a Gramine tool; its failure becomes one line."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise BranchyError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BranchyError(
            f"{Path(argv[0]).name} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
        )
    return proc


def gramine_manifest_argv(defines: dict[str, str]) -> list[str]:
    """gramine-manifest's command line, exactly as the Makefile runs it (in the build directory)."""
    return ["gramine-manifest", *(f"-D{k}={v}" for k, v in defines.items()), MANIFEST_TEMPLATE, MANIFEST]


def sign_argv(signing_key: str) -> list[str]:
    return ["gramine-sgx-sign", "--key", signing_key, "--manifest", MANIFEST, "--output", SGX_MANIFEST]


SIGSTRUCT_VIEW_ARGV = ["gramine-sgx-sigstruct-view", "--output-format", "json", SIGSTRUCT]


def parse_sigstruct_view(text: str) -> dict:
    """MRENCLAVE, MRSIGNER, ISV ids and the debug flag from ``gramine-sgx-sigstruct-view
    --output-format json`` (its text format is documented as unstable)."""
    try:
        fields = json.loads(text)
        mrenclave, mrsigner = str(fields["mr_enclave"]).lower(), str(fields["mr_signer"]).lower()
        if not (re.fullmatch(r"[0-9a-f]{64}", mrenclave) and re.fullmatch(r"[0-9a-f]{64}", mrsigner)):
            raise ValueError
        isv_prod_id, isv_svn, debug = fields["isv_prod_id"], fields["isv_svn"], fields["debug_enclave"]
        if not (type(isv_prod_id) is int and type(isv_svn) is int and type(debug) is bool):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise BranchyError("cannot read MRENCLAVE/MRSIGNER from gramine-sgx-sigstruct-view's JSON output") from None
    return {
        "mrenclave": mrenclave,
        "mrsigner": mrsigner,
        "isv_prod_id": isv_prod_id,
        "isv_svn": isv_svn,
        "debug": debug,
    }


def read_sigstruct(directory: str | os.PathLike[str]) -> dict:
    """The measurements in DIR's SIGSTRUCT, read by gramine-sgx-sigstruct-view."""
    d = Path(directory)
    if not (d / SIGSTRUCT).is_file():
        raise BranchyError(f"{d / SIGSTRUCT} does not exist: nothing was signed; run `make SGX=1` in {d} first")
    if not which("gramine-sgx-sigstruct-view"):
        raise BranchyError(f"gramine-sgx-sigstruct-view is not installed: {INSTALL_HINT}")
    return parse_sigstruct_view(run_tool(SIGSTRUCT_VIEW_ARGV, cwd=str(d)).stdout)


def manifest_figures(path: str | os.PathLike[str]) -> dict:
    """Trusted files, size and SHA-256 of a manifest rendered by gramine-manifest; refuses one that
    Gramine 1.7 or older rendered (no loader.entrypoint, trusted files not hashed)."""
    data = Path(path).read_bytes()
    manifest = tomllib.loads(data.decode())
    trusted = manifest.get("sgx", {}).get("trusted_files", [])
    hashed = (
        isinstance(manifest.get("loader", {}).get("entrypoint"), dict) and "sha256" in manifest["loader"]["entrypoint"]
    )
    if not hashed or not all(isinstance(t, dict) and "sha256" in t for t in trusted):
        raise BranchyError(
            f"the gramine-manifest on PATH ({which('gramine-manifest')}) did not add loader.entrypoint "
            f"and hash the trusted files, so it is Gramine 1.7 or older; this enclave needs Gramine {SUPPORTED_GRAMINE}"
        )
    return {
        "trusted_files": len(trusted),
        "manifest_bytes": len(data),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
    }
