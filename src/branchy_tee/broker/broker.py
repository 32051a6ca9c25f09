"""Key broker (owner side): releases keys to enclaves whose evidence verifies and matches a policy.

HTTP API (JSON; every error is ``{"error": "<one line>", "code": "<machine code>"}``)::

    GET  /v1/health   -> {"status": "ok", "protocol": "branchy-tee/v1", "keys": n}
    GET  /v1/identity -> {"protocol", "identity": hex (the broker's Ed25519 public key)}
    GET  /v1/nonce    -> {"protocol", "identity", "nonce": hex, "expires_in": s, "key_ids": [ids released]}
    POST /v1/keys     {"evidence_type", "evidence": b64, "public_key": hex, "nonce": hex, "key_ids": [...],
                       "collateral": {...} (optional; used only if the policy accepts client collateral)}
                      -> {"protocol", "suite", "identity", "keys": {kid: b64(HPKE enc || ct)},
                          "min_model_version": n, "allowed_data_owners": [hex] | null, "signature": hex}

A key request is checked in this order: well-formed (400, 413 over 64 KiB), key ids known (404) and
released by the policy (403), nonce issued by this broker instance, unexpired and unused (403; it is
marked used here, before anything else can answer), evidence verifies (403: DCAP quote chain and
signatures with ``verify_quote``, or the simulated document's signature), the policy accepts the
claims (403), REPORTDATA = SHA-256("branchy-tee/v1" || public key || nonce) || 0^32 (403). Then
every key is HPKE-sealed to the enclave's public key and the whole release (nonce, public key,
sealed keys, minimum model version, the policy's ``allowed_data_owners``) is signed with the
broker's identity (see ``protocol``). Every decision is one JSON
line in the audit log (flushed and fsynced before the answer leaves; never a key); if the audit
line cannot be written the keys are not released.

Nonces are stateless to issue: issued-at time, 16 random bytes and an HMAC tag under a secret drawn
when the broker starts. Only used nonces are remembered, until they expire; a restarted broker has a
new secret, so it refuses every nonce of its previous life and can never re-issue one.

Owner-side code. The HTTP side (aiohttp) is ``broker.server``: ``start_broker`` runs a broker
in a background thread (tests, the demo), ``serve`` in the foreground (``branchy-tee key-broker``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from branchy_tee.core.errors import AttestationError, BranchyError, PolicyError
from branchy_tee.core.fileio import read_key_file
from branchy_tee.core.keys import key_id
from branchy_tee.tee.attest import identity as ident
from branchy_tee.tee.attest.protocol import (
    NONCE_BYTES,
    PROTOCOL,
    RELEASE_PURPOSE,
    SUITE,
    KeyRelease,
    KeyRequest,
    MessageError,
    NonceOffer,
    key_info,
    pack_key,
    report_data,
)
from branchy_tee.tee.attest.providers import simulated_warning
from branchy_tee.verifier.evidence import verify_evidence
from branchy_tee.verifier.policy import Claims, Decision, Policy, load_policy, parse_policy

__all__ = ["Broker", "NonceBook", "Refusal", "load_keystore"]


class Refusal(Exception):
    """A refused request: HTTP status, machine-readable code, one-line reason."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


# --------------------------------------------------------------------------- keystore
def load_keystore(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Key id -> key from a directory of ``*.key`` files (32 bytes, mode 0600) or one key file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.key"))
        if not files:
            raise BranchyError(f"keystore {p} holds no *.key files")
    elif p.exists():
        files = [p]
    else:
        raise BranchyError(f"keystore {p} not found")
    return {key_id(k): k for k in map(read_key_file, files)}


def _as_keys(keys) -> dict[str, bytes]:
    if isinstance(keys, (str, os.PathLike)):
        return load_keystore(keys)
    if isinstance(keys, Mapping):
        out = dict(keys)
        for kid, k in out.items():
            if not isinstance(k, bytes) or len(k) != 32 or key_id(k) != kid:
                raise BranchyError(f"keystore entry {kid!r} is not a 32-byte key with that id")
        return out
    out = {}
    for k in keys:
        if not isinstance(k, bytes) or len(k) != 32:
            raise BranchyError("keys must be 32 bytes")
        out[key_id(k)] = k
    return out


def _as_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return parse_policy(policy)
    return load_policy(policy)


# --------------------------------------------------------------------------- nonces
class NonceBook:
    """Single-use, expiring nonces: stateless to issue, remembered only once used, until expiry."""

    TAG = 16

    def __init__(self, ttl: float = 60.0, clock: Callable[[], float] = time.time, skew: float = 5.0):
        if ttl <= 0:
            raise ValueError("nonce lifetime must be positive")
        self.ttl, self.clock, self.skew = float(ttl), clock, skew
        self._secret = secrets.token_bytes(32)  # new on every start: old nonces die with the process
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, b"branchy-tee/v1 nonce\0" + body, hashlib.sha256).digest()[: self.TAG]

    def issue(self) -> bytes:
        body = int(self.clock() * 1000).to_bytes(8, "big") + secrets.token_bytes(16)
        return body + self._tag(body)

    def consume(self, nonce: bytes) -> None:
        """Accept a nonce once; raise Refusal if forged/foreign, expired or already used."""
        if len(nonce) != NONCE_BYTES:
            raise Refusal(400, "bad_request", f"nonce must be {NONCE_BYTES} bytes")
        body, tag = nonce[: -self.TAG], nonce[-self.TAG :]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise Refusal(
                403,
                "nonce_unknown",
                "nonce was not issued by this broker (forged, or issued before "
                "a restart); get a fresh one from /v1/nonce",
            )
        issued = int.from_bytes(body[:8], "big") / 1000.0
        now = self.clock()
        with self._lock:
            if nonce in self._used:
                raise Refusal(
                    403,
                    "nonce_replayed",
                    "nonce was already used (replayed request); every request needs a fresh nonce from /v1/nonce",
                )
            age = now - issued
            if age > self.ttl:
                raise Refusal(403, "nonce_expired", f"nonce expired: {age:.0f} s old, lifetime {self.ttl:g} s")
            if age < -self.skew:
                raise Refusal(403, "nonce_unknown", "nonce is from the future (broker clock went backwards)")
            self._used[nonce] = issued + self.ttl
            if now >= self._next_prune:
                self._used = {n: exp for n, exp in self._used.items() if exp >= now}
                self._next_prune = now + self.ttl / 4

    @property
    def used_count(self) -> int:
        return len(self._used)


def _as_identity(identity) -> Ed25519PrivateKey:
    if identity is None:  # tests and the demo: a fresh identity per broker (``.identity_hex`` tells it)
        return Ed25519PrivateKey.generate()
    if isinstance(identity, Ed25519PrivateKey):
        return identity
    return ident.load_identity(identity)


# --------------------------------------------------------------------------- the broker
class Broker:
    """The key broker's logic, independent of HTTP: nonces, evidence, policy, sealing, audit."""

    def __init__(
        self,
        keys,
        policy,
        *,
        identity=None,
        audit_log: str | os.PathLike[str] | None = None,
        nonce_ttl: float = 60.0,
        clock: Callable[[], float] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.identity = _as_identity(identity)
        self.identity_bytes = ident.public_bytes(self.identity)
        self.keys = _as_keys(keys)
        if not self.keys:
            raise BranchyError("the keystore holds no keys")
        self.policy = _as_policy(policy)
        if self.policy.key_ids is not None:
            missing = [k for k in self.policy.key_ids if k not in self.keys]
            if missing:
                raise BranchyError(
                    f"policy {self.policy.source} releases key id(s) {', '.join(missing)}, "
                    f"which the keystore does not hold (it holds {', '.join(sorted(self.keys))})"
                )
        self.clock = clock or time.time
        self.nonces = NonceBook(nonce_ttl, self.clock)
        self.log = log or (lambda msg: None)
        self.audit_path = Path(audit_log) if audit_log is not None else None
        self._audit_fd: int | None = None
        self._audit_lock = threading.Lock()
        if self.audit_path is not None:
            try:
                self._audit_fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as e:
                raise BranchyError(f"cannot open audit log {self.audit_path}: {e.strerror or e}") from None
        self.granted = 0
        self.refused = 0

    @property
    def released_ids(self) -> list[str]:
        return sorted(k for k in self.keys if self.policy.releases(k))

    def close(self) -> None:
        with self._audit_lock:
            if self._audit_fd is not None:
                os.close(self._audit_fd)
                self._audit_fd = None

    # ---- endpoints
    def health(self) -> dict:
        return {"status": "ok", "protocol": PROTOCOL, "keys": len(self.released_ids)}

    @property
    def identity_hex(self) -> str:
        return self.identity_bytes.hex()

    def identity_document(self) -> dict:
        return {"protocol": PROTOCOL, "identity": self.identity_hex}

    def nonce(self) -> dict:
        offer = NonceOffer(self.nonces.issue(), tuple(self.released_ids), self.identity_bytes, self.nonces.ttl)
        return offer.to_json()

    def request_keys(self, body: bytes, remote: str | None) -> dict:
        """Handle one POST /v1/keys body: the response dict, or Refusal. Always audited."""
        entry: dict[str, Any] = {"remote": remote}
        try:
            response = self._grant(body, entry)
        except Refusal as r:
            self._decide(entry, r.status, r.code, r.reason)
            raise
        except Exception as e:  # a bug: fail closed, audited, with the traceback for the operator
            import traceback

            traceback.print_exc()
            failed = Refusal(500, "internal_error", f"internal error ({type(e).__name__}); nothing released")
            self._decide(entry, failed.status, failed.code, failed.reason)
            raise failed from None
        self._decide(entry, 200, "granted", None)
        return response

    def refuse_unread(self, remote: str | None, status: int, code: str, reason: str) -> Refusal:
        """A request refused before its body was read (e.g. too large): audited like the others."""
        self._decide({"remote": remote}, status, code, reason)
        return Refusal(status, code, reason)

    # ---- the checks
    def _grant(self, body: bytes, entry: dict) -> dict:
        req, recipient = self._parse_request(body, entry)
        self._check_key_ids(req.key_ids)
        self.nonces.consume(req.nonce)  # single use from here on, whatever the outcome
        claims, decision = self._attest(req, entry)
        release = KeyRelease(
            self.identity_bytes,
            req.nonce,
            req.public_key,
            tuple(sorted(self._seal_keys(req, recipient, decision.min_model_version))),
            decision.min_model_version,
            decision.allowed_data_owners,
            decision.plaintext_results,
        )
        signature = ident.sign(self.identity, RELEASE_PURPOSE, release.message())
        entry["min_model_version"] = decision.min_model_version
        if decision.allowed_data_owners is not None:
            entry["allowed_data_owners"] = len(decision.allowed_data_owners)
        if claims.simulated:
            simulated_warning(
                f"EVIDENCE ACCEPTED by the key broker: releasing key(s) {', '.join(req.key_ids)} "
                f"to {entry.get('remote')}"
            )
        return release.to_json(signature)

    def _parse_request(self, body: bytes, entry: dict) -> tuple[KeyRequest, X25519PublicKey]:
        try:
            req = KeyRequest.parse(body)
        except MessageError as e:
            raise Refusal(400, "bad_request", str(e)) from None
        entry.update(evidence_type=req.evidence_type, key_ids=list(req.key_ids), nonce=req.nonce.hex())
        try:
            recipient = X25519PublicKey.from_public_bytes(req.public_key)
            X25519PrivateKey.generate().exchange(recipient)  # refuses low-order points
        except ValueError:
            raise Refusal(400, "bad_request", "'public_key' is not a usable X25519 public key") from None
        return req, recipient

    def _check_key_ids(self, kids: Sequence[str]) -> None:
        unknown = [k for k in kids if k not in self.keys]
        if unknown:
            raise Refusal(404, "unknown_key_id", f"this broker holds no key with id {', '.join(unknown)}")
        withheld = [k for k in kids if not self.policy.releases(k)]
        if withheld:
            raise Refusal(403, "key_not_released", f"the policy does not release key id {', '.join(withheld)}")

    def _attest(self, req: KeyRequest, entry: dict) -> tuple[Claims, Decision]:
        """The evidence verified, the policy applied, and REPORTDATA binding this request's key and nonce."""
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        try:
            claims = verify_evidence(self.policy, req.evidence_type, req.evidence, collateral=req.collateral, now=now)
        except AttestationError as e:
            raise Refusal(403, "evidence_invalid", f"evidence does not verify: {e}") from None
        except BranchyError as e:  # the broker's side, e.g. its collateral file vanished
            raise Refusal(500, "broker_error", f"the broker cannot verify evidence now: {e}") from None
        entry["claims"] = claims.summary()
        try:
            decision = self.policy.evaluate(claims)
        except PolicyError as e:
            raise Refusal(403, "policy_refused", f"policy refused: {e}") from None
        entry["warnings"] = list(decision.warnings)
        if not hmac.compare_digest(claims.report_data[:32], report_data(req.public_key, req.nonce)[:32]):
            raise Refusal(
                403,
                "binding_mismatch",
                "REPORTDATA does not bind this public key and nonce "
                "(expected SHA-256('branchy-tee/v1' || public key || nonce) || settings digest)",
            )
        return claims, decision

    def _seal_keys(self, req: KeyRequest, recipient: X25519PublicKey, version: int) -> list[tuple[str, bytes]]:
        return [
            (kid, SUITE.encrypt(pack_key(self.keys[kid], version), recipient, info=key_info(kid, req.nonce)))
            for kid in req.key_ids
        ]

    # ---- audit
    def _decide(self, entry: dict, status: int, code: str, reason: str | None) -> None:
        granted = status == 200
        line = {
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "event": "key_request",
            "decision": "granted" if granted else "refused",
            "status": status,
            "code": code,
            "reason": reason,
            **entry,
        }
        try:
            self.audit(line)
        except OSError as e:
            self.log(f"cannot write the audit log: {e.strerror or e}")
            if granted:  # no unaudited release
                raise Refusal(
                    500, "audit_failed", f"audit log unavailable ({e.strerror or e}); keys not released"
                ) from None
        with self._audit_lock:
            if granted:
                self.granted += 1
            else:
                self.refused += 1
        who = line.get("claims", {}).get("mrenclave", "?")[:16]
        self.log(
            f"{line['decision']} {', '.join(entry.get('key_ids', []) or ['-'])} to {entry.get('remote')} "
            f"(MRENCLAVE {who}...)" + (f": {reason}" if reason else "")
        )

    def audit(self, record: dict) -> None:
        """Append one JSON line to the audit log, flushed and fsynced (no-op without a log)."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._audit_lock:  # one whole line at a time, in decision order
            fd = self._audit_fd
            if fd is None:
                if self.audit_path is not None:
                    raise OSError("audit log closed")
                return
            if os.write(fd, data) != len(data):
                raise OSError("short write to the audit log")
        # Outside the lock so concurrent decisions share one disk flush; this fsync starts after our
        # write, so the line is durable before the answer leaves.
        os.fsync(fd)
