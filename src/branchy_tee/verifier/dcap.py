"""Verify Intel DCAP quotes (SGX v3/v4, TDX v4) on ``cryptography``: the pipeline.

Without collateral (``verify_quote(q)``):

1. the PCK chain in the quote (leaf "Intel SGX PCK Certificate", a "PCK Processor/Platform CA",
   root) verifies at ``now`` up to the pinned root, and its last certificate is byte-identical
   to the pinned root (:mod:`.pck`, :mod:`.chain`);
2. the QE report signature verifies with the PCK leaf key;
3. QE report data == SHA-256(attestation key || QE auth data) || 32 zero bytes;
4. the quote signature verifies with the attestation key over header || report body.

With collateral (the dcap-qvl ``QuoteCollateralV3`` JSON layout), also:

5-7. TCB signing chains, TCB info and QE identity signatures, root CA and PCK CRLs, the typed
     TCB info / QE identity and their validity windows (:mod:`.collateral`);
8-10. FMSPC / PCE-ID, the QE identity, the TDX module identity and the TCB status with its
     advisories, the way Intel's QVL decides them (:mod:`.tcb`).

Time problems of the collateral (CRL, TCB info and QE identity windows) raise by default; with
``strict_time=False`` they are returned as ``VerifiedQuote.warnings`` instead (a policy layer may
decide to only flag stale collateral). Certificate validity periods are always enforced.

Only :class:`~branchy_tee.core.errors.AttestationError` (a subclass of ``BranchyError``) leaves
:func:`verify_quote`: anything unexpected raised while checking attacker-supplied data is turned
into an ``AttestationError`` as well (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from branchy_tee.core.errors import BranchyError
from branchy_tee.tee.attest.quote import CERT_TYPE_PCK_CHAIN, INTEL_QE_VENDOR_ID, EnclaveClaims, Quote, parse_quote
from branchy_tee.verifier.chain import PinnedRoot, load_root, pinned_root
from branchy_tee.verifier.collateral import TCB_STATUSES, Collateral, read_collateral_file, verify_collateral
from branchy_tee.verifier.crl import Clock, check_crl, load_crl
from branchy_tee.verifier.pck import SGX_EXTENSION_OID, PckChain, PckExtension, parse_pck_extension, verify_pck_chain
from branchy_tee.verifier.pki import cn, fail, p256_from_raw, require_p256, verify_raw_sig
from branchy_tee.verifier.tcb import TcbResult, evaluate_tcb

__all__ = [
    "VerifiedQuote",
    "PckExtension",
    "verify_quote",
    "load_root",
    "read_collateral_file",
    "parse_pck_extension",
    "TCB_STATUSES",
    "SGX_EXTENSION_OID",
]


@dataclass(frozen=True, kw_only=True)
class VerifiedQuote(EnclaveClaims):
    """Claims of a quote that verified. Hex is lower-case in ``to_json``.

    ``tcb_status`` is None when no collateral was given (then neither the QE identity nor the TCB
    level were checked). ``advisories`` lists Intel advisory ids of the matched TCB levels.
    ``warnings`` holds collateral time problems found with ``strict_time=False`` (empty otherwise).
    For TDX, ``mrenclave`` is MRTD and ``mrsigner`` is MRSIGNERSEAM, ``isv_prod_id``/``isv_svn`` are 0
    (see :class:`~branchy_tee.tee.attest.quote.Quote`); ``quote.body`` has every TD report field.
    ``collateral`` is the typed collateral the TCB status was decided on (None without collateral).
    """

    version: int
    tee: str
    tcb_status: str | None
    advisories: list[str]
    fmspc: str  # hex, from the PCK certificate
    pce_id: str  # hex, from the PCK certificate
    warnings: list[str] = field(default_factory=list)
    platform_tcb_status: str | None = None
    qe_tcb_status: str | None = None
    tdx_module_tcb_status: str | None = None
    tcb_date: str | None = None
    quote: Quote | None = field(default=None, repr=False, compare=False)
    collateral: Collateral | None = field(default=None, repr=False, compare=False)

    @property
    def tcb_evaluation_data_number(self) -> int | None:
        """The collateral's TCB evaluation data number (the lower of TCB info's and QE identity's),
        for a policy minimum; None without collateral or when either document lacks one."""
        return self.collateral.tcb_evaluation_data_number if self.collateral else None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "tee": self.tee,
            **self.report_fields(),
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "fmspc": self.fmspc,
            "pce_id": self.pce_id,
            "warnings": list(self.warnings),
        }


def verify_quote(
    quote: bytes | Quote,
    *,
    collateral: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    root_pem: bytes | None = None,
    strict_time: bool = True,
    crls: Sequence[bytes | str] | None = None,
) -> VerifiedQuote:
    """Verify a DCAP quote and return its claims; raise :class:`AttestationError` otherwise.

    ``quote``: raw bytes or a parsed :class:`Quote`. ``collateral``: a dict in the dcap-qvl
    ``QuoteCollateralV3`` JSON layout (see :func:`read_collateral_file`), enables TCB status.
    ``now``: the time to check against (default: the current time; naive means UTC).
    ``root_pem``: the pinned root (PEM or DER; default the bundled Intel SGX Root CA).
    ``strict_time=False``: collateral time problems (TCB info / QE identity / CRL windows) go to
    ``warnings`` instead of raising. ``crls``: extra CRLs (DER, PEM or hex) issued by the root or
    the PCK intermediate CA, checked like the collateral's (useful without full collateral).
    """
    try:
        return _verify(quote, collateral, now, root_pem, strict_time, crls)
    except BranchyError:
        raise
    except Exception as e:  # fail closed: attacker-controlled input must never crash the caller
        raise fail(f"quote verification failed: {type(e).__name__}: {e}") from e


def _verify(
    quote: bytes | Quote,
    collateral: Mapping[str, Any] | None,
    now: datetime | None,
    root_pem: bytes | None,
    strict_time: bool,
    crls: Sequence[bytes | str] | None,
) -> VerifiedQuote:
    q = quote if isinstance(quote, Quote) else parse_quote(quote)
    clock = Clock(_utc(now), strict_time)
    root = pinned_root(root_pem)
    _check_quote_kind(q)
    pck = verify_pck_chain(q.pck_chain_pem, root, clock.now)  # 1
    _check_qe_report(q, pck)  # 2, 3
    _check_quote_signature(q)  # 4
    _check_extra_crls(crls or (), root, pck, clock)
    typed, tcb = None, None
    if collateral is not None:
        typed = verify_collateral(collateral, root, pck, clock)  # 5-7
        clock.settle()
        tcb = evaluate_tcb(q, pck.extension, typed.tcb_info, typed.qe_identity)  # 8-10
    clock.settle()
    return _claims(q, pck.extension, tcb, typed, clock.warnings)


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if not isinstance(now, datetime):
        raise fail(f"'now' must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:  # naive: taken as UTC
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _check_quote_kind(q: Quote) -> None:
    """Only Intel's quoting enclave, with the PCK chain in the quote, can be verified here."""
    if q.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise fail(f"quote is not from Intel's quoting enclave (QE vendor id {q.header.qe_vendor_id.hex()})")
    cert_type = q.signature_data.certification_data.cert_type
    if cert_type != CERT_TYPE_PCK_CHAIN:
        raise fail(f"certification data type {cert_type} is not supported (need 5: PCK certificate chain in the quote)")


def _check_qe_report(q: Quote, pck: PckChain) -> None:
    """The PCK key signed the QE report, and the QE report binds the attestation key."""
    sd = q.signature_data
    verify_raw_sig(
        require_p256(pck.leaf, "PCK certificate"),
        sd.qe_report_signature,
        sd.qe_report_bytes,
        "QE report signature (PCK key)",
    )
    expected = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(sd.qe_report.report_data, expected):
        raise fail("QE report data is not SHA-256(attestation key || QE auth data) || 0^32")


def _check_quote_signature(q: Quote) -> None:
    sd = q.signature_data
    verify_raw_sig(
        p256_from_raw(sd.attestation_key, "attestation key"),
        sd.signature,
        q.signed_data,
        "quote signature (attestation key)",
    )


def _check_extra_crls(crls: Sequence[bytes | str], root: PinnedRoot, pck: PckChain, clock: Clock) -> None:
    """CRLs given apart from collateral: each from the root or from the PCK CA."""
    for n, value in enumerate(crls):
        crl = load_crl(value, f"CRL #{n + 1}")
        issuer = root.cert if crl.issuer == root.cert.subject else pck.ca
        check_crl(crl, f"CRL #{n + 1} ({cn(crl.issuer)})", issuer, pck.certs, clock)


def _claims(
    q: Quote, pck: PckExtension, tcb: TcbResult | None, collateral: Collateral | None, warnings: list[str]
) -> VerifiedQuote:
    return VerifiedQuote(
        version=q.version,
        tee=q.tee,
        mrenclave=q.mrenclave,
        mrsigner=q.mrsigner,
        isv_prod_id=q.isv_prod_id,
        isv_svn=q.isv_svn,
        debug=q.debug,
        report_data=q.report_data,
        tcb_status=tcb.status if tcb else None,
        advisories=list(tcb.advisories) if tcb else [],
        fmspc=pck.fmspc.hex(),
        pce_id=pck.pce_id.hex(),
        warnings=list(warnings),
        platform_tcb_status=tcb.platform if tcb else None,
        qe_tcb_status=tcb.qe if tcb else None,
        tdx_module_tcb_status=tcb.module if tcb else None,
        tcb_date=tcb.tcb_date if tcb else None,
        quote=q,
        collateral=collateral,
    )
