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

import dataclasses
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import BranchyError, shown
from branchy_tee.core.fileio import atomic_write_text, read_regular_file
from branchy_tee.core.strict import Fields, canonical_json
from branchy_tee.gramine.build import read_measurements
from branchy_tee.gramine.config import EnclaveConfig, load_config
from branchy_tee.gramine.statement import (
    DANGEROUS,
    MAX_MEMBERS,
    dangerous_settings,
    env_member,
    measured_configuration,
    measured_manifest,
)
from branchy_tee.gramine.tools import MANIFEST, SGX_MANIFEST
from branchy_tee.tee import measured
from branchy_tee.tee.attest.identity import identity_hex, parse_identity, sign, verify

RELEASE_FORMAT = "branchy-tee/release/v3"
OLD_FORMATS = ("branchy-tee/release/v1", "branchy-tee/release/v2")
RELEASE_PURPOSE = b"enclave-release"
MAX_RELEASE_BYTES = 64 * 1024
FIELDS = (
    "format",
    "attest",
    "mrenclave",
    "mrsigner",
    "isv_prod_id",
    "isv_svn",
    "debug",
    "bundle_id",
    "model_version",
    "model_key_id",
    "min_model_version",
    "model_broker",
    "model_broker_identity",
    "manifest_sha256",
    "dev_public_key",
    "measured",
    "dangerous",
    "released_at",
    "model_owner",
)
_HEX = frozenset("0123456789abcdef")


def _hex(n: int | None) -> Callable[[Any], bool]:
    """Lower-case hex of ``n`` characters (any number of them for None)."""
    return lambda v: isinstance(v, str) and (n is None or len(v) == n) and set(v) <= _HEX


def _hex_or_null(n: int) -> Callable[[Any], bool]:
    return lambda v: v is None or _hex(n)(v)


def _u(bits: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and 0 <= v < 1 << bits


@dataclass(frozen=True)
class ReleaseStatement:
    """What the model owner signs about one enclave build: its measurement and what it pins."""

    attest: EvidenceProvider
    mrenclave: str  # 64 hex
    mrsigner: str  # 64 hex; for simulated evidence SHA-256 of the development key's public key
    isv_prod_id: int
    isv_svn: int
    debug: bool
    bundle_id: str
    model_version: int
    model_key_id: str
    min_model_version: int
    model_broker: str
    model_broker_identity: str
    manifest_sha256: str | None
    dev_public_key: str | None  # simulated builds: the shared development key's public key (64 hex)
    measured: dict[str, Any]  # every measured manifest value by dotted path (gramine.statement)
    dangerous: tuple[str, ...]  # the settings in it that need each owner's consent (statement.DANGEROUS)
    released_at: str  # YYYY-MM-DDTHH:MM:SSZ
    model_owner: str  # the signer's identity, 64 hex

    def to_json(self) -> dict[str, Any]:
        """The members that are signed (canonical JSON of this is the signed message)."""
        doc = {"format": RELEASE_FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        return {**doc, "dangerous": list(self.dangerous)}

    def signed_json(self, signature: str) -> dict[str, Any]:
        """The release file's document: the members and the signature (hex)."""
        return {**self.to_json(), "signature": signature}

    @classmethod
    def parse(cls, doc: dict[str, Any], what: str) -> "ReleaseStatement":
        """The statement's members (``FIELDS``, in order, as signed) with every value checked."""
        f = Fields(doc, what, "the release statement")
        f.text("format", lambda v: v == RELEASE_FORMAT, RELEASE_FORMAT)
        s = cls(
            EvidenceProvider(f.check("attest", lambda v: v in EvidenceProvider.names(), "gramine or simulated")),
            f.check("mrenclave", _hex(64), "64 hex digits"),
            f.check("mrsigner", _hex(64), "64 hex digits"),
            f.check("isv_prod_id", _u(16), "a 16-bit number"),
            f.check("isv_svn", _u(16), "a 16-bit number"),
            f.flag("debug"),
            f.check("bundle_id", _hex(32), "32 hex digits"),
            f.check("model_version", _u(63), "a model version"),
            f.check("model_key_id", _hex(16), "a key id"),
            f.check("min_model_version", _u(63), "a model version"),
            f.check("model_broker", lambda v: measured.broker_url_problem(v) is None, "a broker URL"),
            f.check("model_broker_identity", lambda v: measured.identity_problem(v) is None, "an identity"),
            f.check("manifest_sha256", _hex_or_null(64), "64 hex digits or null"),
            f.check("dev_public_key", _hex_or_null(64), "64 hex digits or null"),
            f.check("measured", _measured_values, "a table of measured values"),
            tuple(f.check("dangerous", lambda v: isinstance(v, list), "a list")),
            f.text("released_at", lambda v: len(v) == 20 and set(v) <= set("0123456789-:TZ"), "a UTC time"),
            f.check("model_owner", _hex(64), "an identity"),
        )
        f.done(FIELDS)
        if list(s.dangerous) != dangerous_settings(s.measured):
            raise BranchyError(f"{what}: 'dangerous' does not name exactly the dangerous measured settings")
        if (s.dev_public_key is None) != (s.attest != EvidenceProvider.SIMULATED):
            raise BranchyError(f"{what}: 'dev_public_key' is for simulated builds, and only for them")
        if not _hex(64)(s.measured.get(env_member(measured.SETTINGS_DIGEST))):
            member = env_member(measured.SETTINGS_DIGEST)
            raise BranchyError(f"{what}: the measured settings digest ({member}) is missing")
        return s

    @property
    def settings_sha256(self) -> str:
        """What the enclave puts in REPORTDATA's second half (``measured.settings_binding``), computed
        here from the statement's own loader.env values: policies pin it as allowed_settings."""
        prefix = env_member("")
        env = {k[len(prefix) :]: v for k, v in self.measured.items() if k.startswith(prefix) and isinstance(v, str)}
        return measured.settings_binding(env).hex()


def _measured_values(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v) and len(v) <= MAX_MEMBERS


def measured_env(directory: Path, cfg: EnclaveConfig) -> dict[str, str]:
    """The environment the measurement covers, from the one place the measurement is computed from:
    the signed manifest's ``loader.env`` for SGX, ``gramine.json``'s ``env`` (what the native backend
    runs with and simulated evidence measures) otherwise. Refused when enclave.json contradicts itself."""
    import tomllib

    if cfg.attest == EvidenceProvider.SIMULATED:  # (load_config refused an enclave.json whose env is not its settings')
        return cfg.env
    try:
        manifest = tomllib.loads((directory / SGX_MANIFEST).read_text())
        env = manifest["loader"]["env"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BranchyError(f"cannot read the measured environment from {directory / SGX_MANIFEST}: {e}") from None
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BranchyError(f"{directory / SGX_MANIFEST}: loader.env is not a table of strings")
    return env


def _pins(env: dict[str, str], directory: Path) -> dict[str, Any]:
    """What the measured environment pins, each value checked (no text reaches a policy unchecked)."""
    from branchy_tee.core.keys import KEY_ID_RE

    pins: dict[str, Any] = {
        "bundle_id": env.get(measured.BUNDLE_ID, ""),
        "model_key_id": env.get(measured.MODEL_KEY_ID, ""),
        "model_broker": env.get(measured.MODEL_BROKER, ""),
        "model_broker_identity": env.get(measured.MODEL_BROKER_IDENTITY, ""),
    }
    if not pins["model_broker"]:
        raise BranchyError(
            f"{directory} was built without --model-broker: such an enclave can never get the model key, "
            "so there is nothing to release"
        )
    problems = [
        measured.broker_url_problem(pins["model_broker"]),
        measured.identity_problem(pins["model_broker_identity"]),
        None if KEY_ID_RE.fullmatch(pins["model_key_id"]) else "bad model key id",
        None
        if len(pins["bundle_id"]) == 32 and all(c in "0123456789abcdef" for c in pins["bundle_id"])
        else "bad bundle id",
    ]
    try:
        pins["min_model_version"] = int(env.get(measured.MIN_MODEL_VERSION, ""))
    except ValueError:
        problems.append("bad minimum model version")
    if any(problems):
        raise BranchyError(f"{directory}: the measured settings are unusable ({'; '.join(filter(None, problems))})")
    return pins


def _simulated_measurements(cfg: EnclaveConfig, env: dict[str, str]) -> dict:
    from branchy_tee.tee.attest.providers import code_measurement, dev_public_key, simulated_mrenclave

    code = code_measurement(Path(cfg.package_dir) / "branchy_tee")
    public = dev_public_key(cfg.dev_key)  # the key the owners share (`enclave build --dev-key`)
    return {
        "mrenclave": simulated_mrenclave(env, code).hex(),
        "mrsigner": hashlib.sha256(public).hexdigest(),
        "isv_prod_id": cfg.isv_prod_id,
        "isv_svn": cfg.isv_svn,
        "debug": cfg.debug,
        "dev_public_key": public.hex(),
    }


def make_release(
    directory: str | os.PathLike[str], identity, model_key: bytes, broker_identity: str | None = None
) -> tuple[ReleaseStatement, str]:
    """The signed release statement for the enclave built in ``directory`` (``identity``: the model
    owner's Ed25519 private key). A real-SGX build must have been signed (``make SGX=1``).

    Whatever the directory says, the statement is refused unless the enclave pins the model owner's
    own bundle (its header authenticates under ``model_key``, whose id is the pinned model key id)
    and the model owner's broker (``broker_identity``, by default the signing identity itself). The
    code in the measurement is only as good as the build: reproduce it yourself first."""
    import datetime

    d = Path(directory)
    cfg = load_config(d)
    env = measured_env(d, cfg)
    pins = _pins(env, d)
    m = _simulated_measurements(cfg, env) if cfg.attest == EvidenceProvider.SIMULATED else read_measurements(d)
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.sealed.bundle import open_bundle

    if key_id(model_key) != pins["model_key_id"]:
        raise BranchyError(
            f"the enclave in {d} pins model key id {pins['model_key_id']}, not your model key's "
            f"{key_id(model_key)}: it would serve another model"
        )
    header = open_bundle(cfg.bundle, model_key).header  # the bundle authenticates under your key
    if header.bundle_id != pins["bundle_id"]:
        raise BranchyError(f"the enclave in {d} pins bundle {pins['bundle_id']}, not your bundle {header.bundle_id}")
    expected = broker_identity or identity_hex(identity)
    if not hmac.compare_digest(pins["model_broker_identity"], expected):  # (public values; the lint asks for it)
        raise BranchyError(
            f"the enclave in {d} trusts model broker identity {pins['model_broker_identity']}, not "
            f"{expected}"
            + (
                ""
                if broker_identity
                else " (yours; give --model-broker-identity if your broker runs with another identity)"
            )
        )
    manifest = d / MANIFEST
    signed = cfg.attest != EvidenceProvider.SIMULATED
    values = measured_configuration(measured_manifest(d, signed), None if signed else cfg.env)
    statement = ReleaseStatement(
        attest=cfg.attest,
        **{k: m[k] for k in ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "debug")},
        bundle_id=pins["bundle_id"],
        model_version=header.model_version,
        model_key_id=pins["model_key_id"],
        min_model_version=pins["min_model_version"],
        model_broker=pins["model_broker"],
        model_broker_identity=pins["model_broker_identity"],
        manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
        dev_public_key=m.get("dev_public_key"),
        measured=values,
        dangerous=tuple(dangerous_settings(values)),
        released_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model_owner=identity_hex(identity),
    )
    return statement, sign(identity, RELEASE_PURPOSE, canonical_json(statement.to_json())).hex()


def write_release(
    directory: str | os.PathLike[str],
    identity,
    out: str | os.PathLike[str],
    model_key: bytes,
    broker_identity: str | None = None,
) -> tuple[ReleaseStatement, str]:
    """Sign and write the release statement; returns it and its signature (hex)."""
    statement, signature = make_release(directory, identity, model_key, broker_identity)
    atomic_write_text(out, json.dumps(statement.signed_json(signature), indent=1) + "\n")
    return statement, signature


def verify_release(doc: object, model_owner: str, what: str = "release statement") -> ReleaseStatement:
    """The statement in ``doc`` if it is well formed and signed by ``model_owner`` (64 hex); else
    BranchyError with the reason."""
    owner = parse_identity(model_owner, "--model-owner")
    if isinstance(doc, dict) and doc.get("format") in OLD_FORMATS:
        raise BranchyError(
            f"{what} is in the older format {doc['format']}, which does not show every measured setting: "
            "ask the model owner for a new one (`branchy-tee enclave release`)"
        )
    if not isinstance(doc, dict) or tuple(doc) != (*FIELDS, "signature"):
        raise BranchyError(f"{what} is not a {RELEASE_FORMAT} statement (members differ)")
    statement = {k: doc[k] for k in FIELDS}
    if statement["format"] != RELEASE_FORMAT:
        raise BranchyError(f"{what}: unknown format {shown(statement['format'], 40)}")
    if statement["model_owner"] != model_owner:
        raise BranchyError(
            f"{what} is signed by {shown(statement['model_owner'], 64)}, not by the model owner {model_owner} you named"
        )
    sig = doc["signature"]
    try:
        signature = bytes.fromhex(sig) if isinstance(sig, str) else b""
        message = canonical_json(statement)
    except (ValueError, TypeError):
        signature, message = b"", b""
    if not verify(owner, RELEASE_PURPOSE, message, signature):
        raise BranchyError(
            f"{what}: the signature does not verify under the model owner's identity {model_owner} "
            "(tampered, or signed by someone else)"
        )
    return ReleaseStatement.parse(statement, f"{what} (signed)")  # the signed members, exactly as read


def read_release(path: str | os.PathLike[str], model_owner: str) -> ReleaseStatement:
    raw = read_regular_file(path, "release statement", MAX_RELEASE_BYTES)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BranchyError(f"release statement {path} is not JSON") from None
    return verify_release(doc, model_owner, f"release statement {path}")


def policy_from_release(
    statement: ReleaseStatement,
    *,
    accepted_tcb_statuses=("UpToDate",),
    collateral: str | None = None,
    allowed_data_owners: list[str] | None = None,
    consent: Iterable[str] = (),
) -> str:
    """A key-broker policy (TOML text) that releases keys only to the enclave the statement names.
    Every value written, comments included, was checked by :func:`verify_release` (no raw text)."""
    import tomli_w

    s = statement
    missing = [n for n in s.dangerous if n not in set(consent)]
    if missing:
        raise BranchyError(
            "the release statement names settings that hand the host something, and you did not consent to "
            + "; ".join(f"{DANGEROUS[n][1]} (--allow-{n})" for n in missing)
        )
    policy: dict[str, Any] = {
        "allowed_mrenclave": [s.mrenclave],
        "isv_prod_id": s.isv_prod_id,
        "min_isv_svn": s.isv_svn,
        "allow_debug": "debug" in s.dangerous,  # (only with that owner's consent: see above)
        "accepted_tcb_statuses": list(dict.fromkeys(accepted_tcb_statuses)),
        "min_model_version": s.min_model_version,
        # the enclave's REPORTDATA carries it: binds even a policy that someone later reduces to MRSIGNER
        "allowed_settings": [s.settings_sha256],
    }
    lines = [
        "# Key-broker policy written by `branchy-tee enclave policy` from a release statement signed by the",
        f"# model owner {s.model_owner} (signature verified), released {s.released_at}.",
        f"# The enclave serves bundle {s.bundle_id} (model version {s.model_version}, model key id {s.model_key_id}),",
        f"# gets its model key from {s.model_broker} (identity {s.model_broker_identity}).",
    ]
    lines += [f"# Consented to: {DANGEROUS[n][1]} (--allow-{n})." for n in s.dangerous]
    if s.debug:
        lines.append("# The release names a DEBUG enclave: allow_debug = false makes brokers refuse it.")
    if collateral:
        policy["collateral"] = collateral
    else:
        lines.append(
            '# Add collateral = "collateral.json" (Intel TCB info, QE identity, CRLs): DCAP quotes need a TCB status.'
        )
    if s.attest == EvidenceProvider.SIMULATED:
        policy["allow_simulation"] = True
        policy["simulation_public_keys"] = [s.dev_public_key]
        lines.append("# SIMULATED attestation (development only): no TEE protects the process that gets the keys.")
    if allowed_data_owners is not None:
        for o in allowed_data_owners:
            parse_identity(o, "--allowed-data-owner")
        policy["allowed_data_owners"] = sorted(set(allowed_data_owners))
    if "plaintext-result" in s.dangerous:  # (only with this owner's consent: see above)
        policy["allow_plaintext_results"] = True
        lines.append("# allow_plaintext_results = true: the enclave may write your requests' results in plain text.")
    return "\n".join(lines) + "\n" + tomli_w.dumps(policy)


def write_policy_from_release(
    release: str | os.PathLike[str], model_owner: str, out: str | os.PathLike[str], **kw: Any
) -> ReleaseStatement:
    import tomllib

    from branchy_tee.verifier.policy import parse_policy

    statement = read_release(release, model_owner)
    text = policy_from_release(statement, **kw)
    parse_policy(tomllib.loads(text), str(out), Path(out).parent)  # a policy a broker accepts, or nothing written
    atomic_write_text(out, text)
    return statement
