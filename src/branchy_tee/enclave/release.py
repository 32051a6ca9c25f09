"""The model owner's signed release statement, and data owners' policies written from it.

The host builds and signs the enclave, so any measurement it prints proves nothing. The model owner
reproduces the build (same commit, same bundle, same path: the measurement is reproducible), then
signs a statement with its identity::

    branchy-tee enclave release DIR --identity mo.id --out release.json

It names the measurement (MRENCLAVE, MRSIGNER, ISV ids, debug flag; for ``--attest simulated`` the
simulated measurement of code and measured settings) and what that measurement pins: the bundle id,
model version and model key id, the minimum model version, the model broker and its identity. A data
owner who knows the model owner's identity (out of band) verifies it and writes its broker's policy::

    branchy-tee enclave policy --release release.json --model-owner HEX --out do-policy.toml

so that no owner ever pins a value the host printed. The model owner writes its own broker's policy
the same way, adding the data owners it allows (``--allowed-data-owner``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..attest.identity import identity_hex, parse_identity, sign, verify
from ..errors import BranchyError, shown
from ..fileio import atomic_write_text, read_regular_file
from ..seal.bundle import canonical_json
from .build import MANIFEST, load_config, read_measurements

RELEASE_FORMAT = "branchy-tee/release/v1"
RELEASE_PURPOSE = b"enclave-release"
MAX_RELEASE_BYTES = 64 * 1024
FIELDS = ("format", "attest", "mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "debug", "bundle_id", "model_version",
          "model_key_id", "min_model_version", "model_broker", "model_broker_identity", "manifest_sha256",
          "model_owner")  # fmt: skip


def _simulated_measurements(cfg: dict) -> dict:
    from ..attest.providers import DEV_KEY_FILE, code_measurement, default_dev_key_dir, simulated_mrenclave

    code = code_measurement(Path(cfg["package_dir"]) / "branchy_tee")
    # MRSIGNER of simulated evidence is the hash of the dev key of whoever runs it: known here only if
    # that is this machine's dev key. Policies written from a release never pin it.
    dev_key = default_dev_key_dir() / DEV_KEY_FILE
    mrsigner = None
    if dev_key.is_file():
        from ..attest.providers import SimulatedProvider

        mrsigner = SimulatedProvider(default_dev_key_dir(), mrenclave=bytes(32)).mrsigner.hex()
    return {"mrenclave": simulated_mrenclave(cfg["env"], code).hex(), "mrsigner": mrsigner,
            "isv_prod_id": cfg["isv_prod_id"], "isv_svn": cfg["isv_svn"], "debug": cfg["debug"]}  # fmt: skip


def make_release(directory: str | os.PathLike, identity) -> dict:
    """The signed release statement for the enclave built in ``directory`` (``identity``: the model
    owner's Ed25519 private key). A real-SGX build must have been signed (``make SGX=1``)."""
    d = Path(directory)
    cfg = load_config(d)
    if not cfg.get("model_broker"):
        raise BranchyError(f"{d} was built without --model-broker: such an enclave can never get the model key, "
                           "so there is nothing to release")
    if cfg["attest"] == "simulated":
        m = _simulated_measurements(cfg)
    else:
        m = read_measurements(d)
    manifest = d / MANIFEST
    statement = {
        "format": RELEASE_FORMAT, "attest": cfg["attest"], **{k: m[k] for k in ("mrenclave", "mrsigner", "isv_prod_id",
                                                                                    "isv_svn", "debug")},
        "bundle_id": cfg["bundle_id"], "model_version": cfg["model_version"], "model_key_id": cfg["model_key_id"],
        "min_model_version": cfg["min_model_version"], "model_broker": cfg["model_broker"],
        "model_broker_identity": cfg["model_broker_identity"],
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
        "model_owner": identity_hex(identity),
    }  # fmt: skip
    return {**statement, "signature": sign(identity, RELEASE_PURPOSE, canonical_json(statement)).hex()}


def write_release(directory: str | os.PathLike, identity, out: str | os.PathLike) -> dict:
    statement = make_release(directory, identity)
    atomic_write_text(out, json.dumps(statement, indent=1) + "\n")
    return statement


def verify_release(doc: object, model_owner: str, what: str = "release statement") -> dict:
    """The statement in ``doc`` if it is well formed and signed by ``model_owner`` (64 hex); else
    BranchyError with the reason."""
    owner = parse_identity(model_owner, "--model-owner")
    if not isinstance(doc, dict) or tuple(doc) != (*FIELDS, "signature"):
        raise BranchyError(f"{what} is not a {RELEASE_FORMAT} statement (members differ)")
    statement = {k: doc[k] for k in FIELDS}
    if statement["format"] != RELEASE_FORMAT:
        raise BranchyError(f"{what}: unknown format {shown(statement['format'], 40)}")
    if statement["model_owner"] != model_owner:
        raise BranchyError(f"{what} is signed by {shown(statement['model_owner'], 64)}, not by the model owner "
                           f"{model_owner} you named")
    sig = doc["signature"]
    try:
        signature = bytes.fromhex(sig) if isinstance(sig, str) else b""
        message = canonical_json(statement)
    except (ValueError, TypeError):
        signature, message = b"", b""
    if not verify(owner, RELEASE_PURPOSE, message, signature):
        raise BranchyError(f"{what}: the signature does not verify under the model owner's identity {model_owner} "
                           "(tampered, or signed by someone else)")
    _check_fields(statement, what)
    return statement


def _check_fields(s: dict, what: str) -> None:
    def is_hex(v, n: int) -> bool:
        return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)

    def is_int(v, hi: int) -> bool:
        return type(v) is int and 0 <= v <= hi

    ok = (s["attest"] in ("gramine", "simulated") and is_hex(s["mrenclave"], 64)
          and (s["mrsigner"] is None or is_hex(s["mrsigner"], 64)) and is_int(s["isv_prod_id"], 0xFFFF)
          and is_int(s["isv_svn"], 0xFFFF) and isinstance(s["debug"], bool) and is_hex(s["bundle_id"], 32)
          and is_int(s["model_version"], 2**63 - 1) and is_hex(s["model_key_id"], 16)
          and is_int(s["min_model_version"], 2**63 - 1) and is_hex(s["model_broker_identity"], 64)
          and isinstance(s["model_broker"], str))  # fmt: skip
    if not ok:
        raise BranchyError(f"{what}: signed, but a member has an unusable value")


def read_release(path: str | os.PathLike, model_owner: str) -> dict:
    raw = read_regular_file(path, "release statement", MAX_RELEASE_BYTES)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BranchyError(f"release statement {path} is not JSON") from None
    return verify_release(doc, model_owner, f"release statement {path}")


def policy_from_release(statement: dict, *, accepted_tcb_statuses=("UpToDate",), collateral: str | None = None,
                        allowed_data_owners: list[str] | None = None) -> str:
    """A key-broker policy (TOML text) that releases keys only to the enclave the statement names."""
    import tomli_w

    policy: dict = {"allowed_mrenclave": [statement["mrenclave"]], "isv_prod_id": statement["isv_prod_id"],
                    "min_isv_svn": statement["isv_svn"], "allow_debug": False,
                    "accepted_tcb_statuses": list(dict.fromkeys(accepted_tcb_statuses)),
                    "min_model_version": statement["min_model_version"]}  # fmt: skip
    lines = [
        "# Key-broker policy written by `branchy-tee enclave policy` from a release statement signed by the",
        f"# model owner {statement['model_owner']} (signature verified).",
        f"# The enclave serves bundle {statement['bundle_id']} (model version {statement['model_version']}, model key id "
        f"{statement['model_key_id']}),",
        f"# gets its model key from {statement['model_broker']} (identity {statement['model_broker_identity']}).",
    ]
    if statement["debug"]:
        lines.append("# The release names a DEBUG enclave: allow_debug = false makes brokers refuse it.")
    if collateral:
        policy["collateral"] = collateral
    else:
        lines.append('# Add collateral = "collateral.json" (Intel TCB info, QE identity, CRLs): DCAP quotes need a TCB status.')
    if statement["attest"] == "simulated":
        policy["allow_simulation"] = True
        lines.append("# SIMULATED attestation (development only): no TEE protects the process that gets the keys.")
    if allowed_data_owners is not None:
        for o in allowed_data_owners:
            parse_identity(o, "--allowed-data-owner")
        policy["allowed_data_owners"] = sorted(set(allowed_data_owners))
    return "\n".join(lines) + "\n" + tomli_w.dumps(policy)


def write_policy_from_release(release: str | os.PathLike, model_owner: str, out: str | os.PathLike, **kw) -> dict:
    import tomllib

    from ..attest.policy import parse_policy

    statement = read_release(release, model_owner)
    text = policy_from_release(statement, **kw)
    parse_policy(tomllib.loads(text), str(out), Path(out).parent)  # a policy a broker accepts, or nothing written
    atomic_write_text(out, text)
    return statement
