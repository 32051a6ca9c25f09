"""Certificate revocation lists, and the clock that collects validity-window problems.

A CRL counts only when it is issued (and signed) by the CA it is checked against, and within its
window; then no certificate that CA issued in the chains at hand may be on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from cryptography import x509

from branchy_tee.verifier.pki import X509_ERRORS, cn, fail, hex_bytes, iso, require_p256, strict_parse


class Clock:
    """The verification time. Collects time-window problems; ``settle()`` raises them all at once
    unless ``core.strict`` is False (then they stay in ``warnings``)."""

    def __init__(self, now: datetime, strict: bool) -> None:
        self.now = now
        self.strict = strict
        self.warnings: list[str] = []

    def window(self, what: str, start: datetime | None, end: datetime | None) -> None:
        problem = None
        if end is None:
            problem = f"{what} has no next-update time"
        elif self.now > end:
            problem = f"{what} expired at {iso(end)} (now {iso(self.now)})"
        elif start is not None and self.now < start:
            problem = f"{what} is not valid before {iso(start)} (now {iso(self.now)})"
        if problem:
            self.warnings.append(problem)

    def settle(self) -> None:
        if self.strict and self.warnings:
            raise fail("collateral outside its validity window: " + "; ".join(self.warnings))


def load_crl(value: Any, what: str) -> x509.CertificateRevocationList:
    """A CRL given as hex DER, PEM text or raw bytes (DER or PEM), strictly parsed."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-----BEGIN"):
            try:
                data = text.encode("ascii")
            except UnicodeEncodeError:
                raise fail(f"{what} is not ASCII PEM") from None
        else:
            data = hex_bytes(text, what)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise fail(f"{what} must be hex DER, PEM or bytes")

    def parse() -> x509.CertificateRevocationList:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        crl.issuer, crl.last_update_utc, crl.next_update_utc, list(crl)  # noqa: B018
        return crl

    return strict_parse(what, parse)


def check_crl(
    crl: x509.CertificateRevocationList,
    what: str,
    issuer: x509.Certificate,
    covered: Iterable[x509.Certificate],
    clock: Clock,
) -> None:
    """``crl`` must be issued and signed by ``issuer`` and revoke none of the ``covered``
    certificates that ``issuer`` issued; its window goes to ``clock``."""
    try:
        crl_issuer = crl.issuer
        if crl_issuer != issuer.subject:
            raise fail(f"{what} is issued by {cn(crl_issuer)!r}, expected {cn(issuer.subject)!r}")
        if not crl.is_signature_valid(require_p256(issuer, f"{what} issuer")):
            raise fail(f"{what} signature does not verify")
        clock.window(what, crl.last_update_utc, crl.next_update_utc)
        for cert in covered:
            if cert.issuer == issuer.subject and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
                raise fail(f"certificate {cn(cert.subject)!r} serial {cert.serial_number:x} is revoked ({what})")
    except X509_ERRORS as e:  # a malformed field cryptography parses lazily
        raise fail(f"{what} is malformed ({e})") from None
