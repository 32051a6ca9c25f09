"""Evidence of either kind verified into its claims: DCAP quotes (``verifier.dcap``) and, for
development, simulated documents signed by a local key (``tee.attest.providers``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from branchy_tee.core.errors import AttestationError
from branchy_tee.core.strict import hex_member
from branchy_tee.tee.attest.protocol import EvidenceType
from branchy_tee.tee.attest.providers import MAX_SIMULATED_EVIDENCE, SIMULATED_FORMAT, SIMULATED_SIGN_DOMAIN
from branchy_tee.tee.attest.quote import REPORT_DATA_LEN, EnclaveClaims
from branchy_tee.verifier.policy import Claims, Policy

# verify_quote uses warnings.catch_warnings (process-global): one verification at a time.
_VERIFY_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class SimulatedDocument(EnclaveClaims):
    """The claims of simulated evidence whose signature verified."""

    public_key: bytes  # raw Ed25519 public key that signed it
    produced_at: str


def _u16_field(doc: dict[str, Any], name: str) -> int:
    v = doc.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
        raise AttestationError(f"simulated evidence: '{name}' missing or not an integer in 0..65535")
    return v


def _bool_field(doc: dict[str, Any], name: str) -> bool:
    v = doc.get(name)
    if not isinstance(v, bool):
        raise AttestationError(f"simulated evidence: '{name}' missing or not a boolean")
    return v


def _hexfield(doc: dict[str, Any], name: str, size: int) -> bytes:
    return hex_member(doc, name, size, AttestationError, "simulated evidence")


def verify_simulated(evidence: bytes) -> SimulatedDocument:
    """Check simulated evidence's signature and shape; return its claims or raise AttestationError.

    The signature proves only possession of the dev key named in the document; which dev keys and
    code measurements are acceptable is the policy's business (``mrsigner`` = SHA-256 of the key).
    """
    if len(evidence) > MAX_SIMULATED_EVIDENCE:
        raise AttestationError("simulated evidence is too large")
    try:
        outer = json.loads(evidence)
        text, sig_hex = outer["document"], outer["signature"]
        if not isinstance(text, str) or not isinstance(sig_hex, str):
            raise TypeError
        sig = bytes.fromhex(sig_hex)
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise TypeError
    except (ValueError, TypeError, KeyError, RecursionError):
        raise AttestationError("simulated evidence is not a signed JSON document") from None
    if doc.get("format") != SIMULATED_FORMAT:
        raise AttestationError(f"simulated evidence: format is not {SIMULATED_FORMAT}")
    public_key = _hexfield(doc, "public_key", 32)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, SIMULATED_SIGN_DOMAIN + text.encode())
    except (InvalidSignature, ValueError):
        raise AttestationError("simulated evidence: signature does not verify") from None
    mrsigner = _hexfield(doc, "mrsigner", 32)
    if not hmac.compare_digest(mrsigner, hashlib.sha256(public_key).digest()):
        raise AttestationError("simulated evidence: mrsigner is not SHA-256 of the signing key")
    return SimulatedDocument(
        mrenclave=_hexfield(doc, "mrenclave", 32),
        mrsigner=mrsigner,
        isv_prod_id=_u16_field(doc, "isv_prod_id"),
        isv_svn=_u16_field(doc, "isv_svn"),
        debug=_bool_field(doc, "debug"),
        report_data=_hexfield(doc, "report_data", REPORT_DATA_LEN),
        public_key=public_key,
        produced_at=str(doc.get("produced_at", ""))[:40],
    )


def verify_evidence(
    policy: Policy,
    evidence_type: EvidenceType | str,
    evidence: bytes,
    *,
    collateral: Mapping | None = None,
    now: datetime | None = None,
) -> Claims:
    """Verify evidence (not yet its binding or the policy) and return its claims; AttestationError otherwise.

    DCAP quotes are verified with the policy's own collateral file. Collateral sent by the client is
    Intel-signed, but the host chooses which: it could send an old one from before a TCB recovery.
    So it is ignored unless the policy says ``accept_client_collateral = true`` (which requires
    ``min_tcb_evaluation_data_number``, checked by the policy). ``stale_collateral = "warn"`` turns
    expired collateral into warnings.
    """
    if evidence_type == EvidenceType.DCAP:
        from branchy_tee.verifier.dcap import verify_quote

        chosen: Mapping[str, Any] | None = policy.collateral()
        if chosen is None and policy.accept_client_collateral:
            chosen = collateral
        with _VERIFY_LOCK:
            vq = verify_quote(evidence, collateral=chosen, now=now, strict_time=policy.strict_time)
        return Claims.from_quote(vq, vq.tcb_evaluation_data_number if vq.tcb_status is not None else None)
    if evidence_type == EvidenceType.SIMULATED:
        return Claims.from_simulated(verify_simulated(evidence))
    raise AttestationError(f"unknown evidence type {ascii(str(evidence_type))}")
