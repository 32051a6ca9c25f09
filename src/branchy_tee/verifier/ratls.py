"""The verifier's side of attested TLS (``tee.attest.ratls`` is the enclave's): the server's RA-TLS
certificate checked against a data owner's policy."""

from __future__ import annotations

import datetime

from cryptography import x509

from branchy_tee.core.errors import AttestationError
from branchy_tee.tee.attest.protocol import EvidenceType
from branchy_tee.tee.attest.ratls import (
    CLOCK_SKEW,
    MAX_EVIDENCE,
    RATLS_QUOTE_OID,
    SERVER_CERT_LIFETIME,
    public_key_report_data,
)


def check_validity(cert_der: bytes, now: datetime.datetime | None = None) -> datetime.datetime:
    """The server certificate's end of validity; AttestationError when, by the client's own clock,
    it is expired or not yet valid, or valid for longer than serve ever makes one (a certificate
    whose key leaked once would otherwise keep working)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert = x509.load_der_x509_certificate(cert_der)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if end - start > SERVER_CERT_LIFETIME + CLOCK_SKEW:
        raise AttestationError(
            f"the server's certificate is valid for {end - start}, longer than the "
            f"{SERVER_CERT_LIFETIME + CLOCK_SKEW} a branchy-tee server gives one: refused"
        )
    if not start - CLOCK_SKEW <= now <= end:
        raise AttestationError(
            f"the server's certificate is valid from {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} UTC, "
            f"and it is now {now:%Y-%m-%d %H:%M:%S} UTC here: expired or not yet valid"
        )
    return end


def evidence_of(cert_der: bytes | None) -> tuple[str, bytes, bytes]:
    """(evidence type, evidence, the report data this certificate's key requires); AttestationError
    when the certificate is not an RA-TLS certificate (or there is none)."""
    if cert_der is None:
        raise AttestationError("the server's certificate cannot be parsed")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        ext = cert.extensions.get_extension_for_oid(RATLS_QUOTE_OID).value
        assert isinstance(ext, x509.UnrecognizedExtension)  # cryptography knows no parser for this OID
        evidence = ext.value
        expected = public_key_report_data(cert.public_key())
    except x509.ExtensionNotFound:
        raise AttestationError(
            "the server's certificate carries no attestation evidence (not an RA-TLS certificate)"
        ) from None
    except (ValueError, TypeError):
        raise AttestationError("the server's certificate cannot be parsed") from None
    if not 0 < len(evidence) <= MAX_EVIDENCE:
        raise AttestationError("the server's attestation evidence has an impossible size")
    kind = EvidenceType.SIMULATED if evidence[:1] == b"{" else EvidenceType.DCAP
    return kind, evidence, expected


def verify_server_certificate(cert_der: bytes | None, policy, *, now=None):
    """Verify an RA-TLS certificate against a data owner's policy; return the enclave's claims.

    The evidence must verify, bind this certificate's public key in its REPORTDATA, and satisfy the
    policy (measurement, TCB status with the policy's collateral, debug, simulation only if allowed).
    """
    import hmac

    from branchy_tee.core.errors import PolicyError
    from branchy_tee.verifier.evidence import verify_evidence

    kind, evidence, expected = evidence_of(cert_der)
    assert cert_der is not None  # (evidence_of refuses None)
    check_validity(cert_der, now)
    claims = verify_evidence(policy, kind, evidence, now=now)
    if not hmac.compare_digest(claims.report_data[:32], expected[:32]):
        raise AttestationError(
            "the server's evidence does not bind the key of the certificate it presented "
            "(REPORTDATA is not SHA-256 of its public key): evidence copied from another server"
        )
    try:
        policy.evaluate(claims)
    except PolicyError as e:
        raise AttestationError(f"the server's enclave is refused by your policy: {e}") from None
    return claims
