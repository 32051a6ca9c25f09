"""Certificate chains up to the pinned root: the PCK chain in a quote and the TCB signing chains of
the collateral are both checked here.

A chain is leaf, intermediate CA(s), root, in that order; it verifies with
``cryptography.x509.verification`` at a given time, and its last certificate must be
byte-identical to the pinned root (the bundled Intel SGX Root CA unless a caller pins another).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Sequence

from cryptography import x509
from cryptography.x509 import verification as xv

from branchy_tee.core.errors import AttestationError
from branchy_tee.tee.attest.quote import split_pem_chain
from branchy_tee.verifier.pki import X509_ERRORS, cn, der, der_items, fail, iso, strict_parse

_TAG_BIT_STRING, _TAG_SEQUENCE = 0x03, 0x30  # DER universal tags


@dataclass(frozen=True)
class PinnedRoot:
    """The root CA every chain must end at, with its DER bytes for the identity check."""

    cert: x509.Certificate
    der: bytes


@functools.lru_cache(maxsize=8)
def _root_from_bytes(data: bytes) -> PinnedRoot:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except X509_ERRORS as e:
        raise fail(f"pinned root CA is not a PEM or DER certificate ({e})") from None
    return PinnedRoot(cert, der(cert))


@functools.lru_cache(maxsize=1)
def _bundled_root_bytes() -> bytes:
    return resources.files("branchy_tee.verifier").joinpath("data/intel-sgx-root-ca.pem").read_bytes()


def pinned_root(root_pem: bytes | None = None) -> PinnedRoot:
    """``root_pem`` (PEM or DER bytes) or the bundled Intel SGX Root CA."""
    return _root_from_bytes(bytes(root_pem) if root_pem is not None else _bundled_root_bytes())


def load_root(root_pem: bytes | None = None) -> x509.Certificate:
    """The pinned root: ``root_pem`` (PEM or DER bytes) or the bundled Intel SGX Root CA."""
    return pinned_root(root_pem).cert


# --------------------------------------------------------------------------- loading certificates
def _check_signature_bits(data: bytes) -> None:
    """Certificate = SEQUENCE { tbs, algorithm, BIT STRING }: the signature BIT STRING must have
    0 unused bits. cryptography ignores that count, so without this check a changed count would
    give a different byte string for the same certificate (a signature-preserving mutation)."""
    top = der_items(data, 0, len(data), "certificate")
    if len(top) != 1 or top[0][0] != _TAG_SEQUENCE:
        raise fail("certificate: not one DER SEQUENCE")
    parts = der_items(data, top[0][1], top[0][2], "certificate")
    if len(parts) != 3 or parts[2][0] != _TAG_BIT_STRING or parts[2][2] <= parts[2][1]:
        raise fail("certificate: not (tbsCertificate, signatureAlgorithm, signatureValue)")
    if data[parts[2][1]] != 0:
        raise fail("certificate: signature BIT STRING has unused bits")


def _load_pem_cert(block: bytes) -> x509.Certificate:
    def parse() -> x509.Certificate:
        cert = x509.load_pem_x509_certificate(block)
        # touch the lazily parsed fields now, so a malformed certificate fails here, not mid-check
        cert.subject, cert.issuer, cert.extensions, cert.serial_number  # noqa: B018
        return cert

    cert = strict_parse("a certificate", parse)
    _check_signature_bits(der(cert))
    return cert


@functools.lru_cache(maxsize=64)
def _certs_from_pem_blocks(blocks: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    # Certificates are immutable, so caching the parse of identical bytes is safe.
    return tuple(_load_pem_cert(b) for b in blocks)


def load_chain(blocks: Sequence[bytes], what: str) -> tuple[x509.Certificate, ...]:
    """Strictly parse PEM certificate blocks (leaf first); errors are prefixed with ``what``."""
    try:
        return _certs_from_pem_blocks(tuple(bytes(b) for b in blocks))
    except AttestationError as e:
        raise fail(f"{what}: {e}") from None


def chain_from_pem_text(text: Any, what: str) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM string (e.g. a collateral issuer chain)."""
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise fail(f"{what} is not ASCII PEM") from None
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise fail(f"{what} must be a PEM string")
    blocks = split_pem_chain(data)
    if not blocks:
        raise fail(f"{what} holds no PEM certificate")
    return load_chain(blocks, what)


# --------------------------------------------------------------------------- verifying a chain
def _verifier(root: x509.Certificate, now: datetime) -> xv.ClientVerifier:
    builder = (
        xv.PolicyBuilder()
        .store(xv.Store([root]))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(
            ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=xv.ExtensionPolicy.permit_all(),
        )
    )
    return builder.build_client_verifier()


def verify_chain(
    certs: Sequence[x509.Certificate],
    root: PinnedRoot,
    now: datetime,
    what: str,
    leaf_cn: str,
    ca_cns: Sequence[str],
) -> None:
    """Verify ``certs`` = leaf, CAs named ``ca_cns`` (one each), root; the root must be the pinned one."""
    expected = "leaf, CA, root" if ca_cns else "leaf, root"
    if len(certs) != (3 if ca_cns else 2):
        raise fail(f"{what}: expected {expected.count(',') + 1} certificates ({expected}), got {len(certs)}")
    if der(certs[-1]) != root.der:
        raise fail(f"{what} does not end at the pinned root CA ({cn(certs[-1].subject)!r} is not it)")
    if cn(certs[0].subject) != leaf_cn:
        raise fail(f"{what}: leaf is {cn(certs[0].subject)!r}, expected {leaf_cn!r}")
    for c in certs[1:-1]:
        if cn(c.subject) not in ca_cns:
            raise fail(f"{what}: intermediate CA {cn(c.subject)!r} is not one of {list(ca_cns)}")
    try:
        built = _verifier(root.cert, now).verify(certs[0], list(certs[1:-1]))
    except (xv.VerificationError, *X509_ERRORS) as e:
        raise fail(f"{what} does not verify at {iso(now)}: {e}") from None
    if len(built.chain) != len(certs) or der(built.chain[-1]) != root.der:
        raise fail(f"{what}: the verified path is not the given chain")
