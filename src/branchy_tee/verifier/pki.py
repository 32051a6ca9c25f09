"""What every part of the quote verifier shares: one-line errors, strict parsing of certificates and
CRLs with ``cryptography``, names, hex fields, raw P-256 ECDSA signatures (Intel writes r||s and
x||y, not DER) and a strict DER TLV reader.

Every failure is an :class:`~branchy_tee.core.errors.AttestationError` with a one-line reason.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from branchy_tee.core.errors import AttestationError

T = TypeVar("T")

# What cryptography raises for malformed certificates/CRLs (some fields are parsed lazily).
X509_ERRORS = (
    ValueError,
    TypeError,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def fail(reason: str) -> AttestationError:
    """An AttestationError whose message is ``reason`` on one line."""
    return AttestationError(" ".join(str(reason).split()))


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hex_bytes(value: Any, what: str, size: int | None = None) -> bytes:
    """``value`` must be a hex string (of ``size`` bytes when given)."""
    if not isinstance(value, str):
        raise fail(f"{what} must be a hex string")
    try:
        out = bytes.fromhex(value)
    except ValueError:
        raise fail(f"{what} is not hex") from None
    if size is not None and len(out) != size:
        raise fail(f"{what} must be {size} bytes, got {len(out)}")
    return out


def strict_parse(what: str, parse: Callable[[], T]) -> T:
    """Run ``parse()``; cryptography's warnings about non-conformant DER (negative serials, bad
    attribute lengths) reject the input instead of reaching stderr. (``catch_warnings`` touches
    global state: do not verify quotes from several threads at once.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = parse()
        except X509_ERRORS as e:
            raise fail(f"{what} is malformed ({e})") from None
    if caught:
        raise fail(f"{what} is not well-formed ({caught[0].message})")
    return out


def cn(name: x509.Name) -> str | None:
    """The single common name of ``name``, or None."""
    try:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError):
        return None
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- raw P-256 ECDSA
def _raw_sig_to_der(sig: bytes) -> bytes:
    if len(sig) != 64:
        raise fail(f"ECDSA signature must be 64 bytes (r||s), got {len(sig)}")
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


def p256_from_raw(key: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its raw 64-byte x||y point."""
    if len(key) != 64:
        raise fail(f"{what}: expected a 64-byte raw P-256 point, got {len(key)} bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + key)
    except ValueError:
        raise fail(f"{what} is not a valid P-256 point") from None


def require_p256(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    """The certificate's public key, which must be ECDSA P-256."""
    try:
        key = cert.public_key()
    except (ValueError, TypeError) as e:  # unsupported key algorithm
        raise fail(f"{what}: unusable public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise fail(f"{what}: public key is not ECDSA P-256")
    return key


def verify_raw_sig(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, what: str) -> None:
    """Check a raw r||s ECDSA-SHA256 signature over ``data``."""
    try:
        key.verify(_raw_sig_to_der(sig), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise fail(f"{what} does not verify") from None
    except ValueError as e:  # e.g. r or s out of range for the encoder
        raise fail(f"{what} does not verify ({e})") from None


# --------------------------------------------------------------------------- DER
def der_items(buf: bytes, start: int, end: int, what: str = "SGX extension") -> list[tuple[int, int, int]]:
    """The TLV items in ``buf[start:end]`` as (tag, content_start, content_end); strict DER lengths."""
    items = []
    pos = start
    while pos < end:
        if end - pos < 2:
            raise fail(f"{what}: truncated DER item")
        tag = buf[pos]
        if tag & 0x1F == 0x1F:
            raise fail(f"{what}: high-tag-number DER form not expected")
        first = buf[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4:
                raise fail(f"{what}: unsupported DER length form")
            if end - pos < n:
                raise fail(f"{what}: truncated DER length")
            length = int.from_bytes(buf[pos : pos + n], "big")
            pos += n
            if length < 0x80 or buf[pos - n] == 0:
                raise fail(f"{what}: non-minimal DER length")
        if length > end - pos:
            raise fail(f"{what}: DER item runs past its container")
        items.append((tag, pos, pos + length))
        pos += length
    return items
