"""What a release statement shows of the measured configuration: every value of the manifest that
the measurement covers, read from the manifest itself (the signed ``.manifest.sgx`` for SGX, the
rendered manifest otherwise), never from a hand-kept list. So a setting added to the template later
appears in the statement without a line of code here, and the tests check that it does.

Each manifest value becomes one member, named by its dotted TOML path (``loader.env.BRANCHY_TEE_ATTEST``,
``sgx.debug``, ``fs.mounts``); lists stay whole. The one exception is ``sgx.trusted_files``: about
1,700 hashed entries, shown as their count and the SHA-256 of their canonical JSON (the model owner
who reproduced the build compares it; the list itself is in the manifest).

The settings that hand the host something (``DANGEROUS``) are named in the statement too, and each
owner's policy is written only with that owner's consent to each (``enclave policy --allow-NAME``).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any, Callable

import tomllib

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import canonical_json
from branchy_tee.tee import measured

SUMMARISED = "sgx.trusted_files"
MAX_MEMBERS = 512


def env_member(name: str) -> str:
    """The statement member of a loader.env variable."""
    return f"loader.env.{name}"


# name (the consent flag is --allow-NAME) -> (is it set in these measured values?, what it hands the host)
DANGEROUS: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "simulated": (
        lambda m: m.get(env_member(measured.ATTEST)) == "simulated",
        "simulated attestation: no TEE protects the process that gets the keys",
    ),
    "debug": (lambda m: m.get("sgx.debug") is True, "a debug enclave: the host can read its memory"),
    "plaintext-result": (
        lambda m: m.get(env_member(measured.ALLOW_PLAINTEXT)) == "1",
        "plaintext results: the host may ask for results it can read",
    ),
    "full-model": (
        lambda m: m.get(env_member(measured.ALLOW_FULL_MODEL)) == "1",
        "--full-model: the host may ignore the model owner's exit thresholds",
    ),
}


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``doc``'s values by dotted path (tables recursed into, lists kept whole), trusted files summarised."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if path == SUMMARISED:
            out[path] = {"count": len(value), "sha256": hashlib.sha256(canonical_json(value)).hexdigest()}
        elif isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return dict(sorted(out.items()))


def dangerous_settings(values: dict[str, Any]) -> list[str]:
    return [name for name, (is_set, _) in DANGEROUS.items() if is_set(values)]


def measured_manifest(directory: Path, signed: bool) -> Path:
    """The manifest the measurement comes from: the signed one for SGX, else the rendered one."""
    from branchy_tee.gramine.tools import MANIFEST, SGX_MANIFEST

    return directory / (SGX_MANIFEST if signed else MANIFEST)


def measured_configuration(path: Path, expected_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every measured value of the manifest at ``path`` (see the module docstring). With
    ``expected_env``: refused unless its loader.env is exactly that (for builds whose measurement is
    computed from enclave.json: the manifest must say the same)."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BranchyError(f"cannot read the measured configuration from {path}: {e}") from None
    values = flatten(doc)
    if len(values) > MAX_MEMBERS:
        raise BranchyError(
            f"{path}: {len(values)} measured values, more than a release statement shows ({MAX_MEMBERS})"
        )
    env = doc.get("loader", {}).get("env")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BranchyError(f"{path}: loader.env is not a table of strings")
    if expected_env is not None and not hmac.compare_digest(canonical_json(env), canonical_json(expected_env)):
        raise BranchyError(f"{path}: its loader.env differs from the build's enclave.json (edited after the build)")
    return values
