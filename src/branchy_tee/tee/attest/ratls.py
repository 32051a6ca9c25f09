"""Attested TLS in Gramine's RA-TLS form, and client certificates made from party identities.

Server (enclave) side, as Gramine's ``ra_tls_create_key_and_crt_der`` does it: a fresh ECDSA P-384
key pair, evidence whose REPORTDATA is SHA-256(the DER SubjectPublicKeyInfo of that key) || the
enclave's measured settings digest (Gramine's own puts zeros there),
and a self-signed certificate carrying the evidence as a non-critical X.509 extension. The
extension's OID is the one Gramine writes (the bytes of its ``NON_STANDARD_INTEL_SGX_QUOTE_OID``
taken as the OID's content, i.e. ``0.6.9.42.840.113741.1337.6``), so Gramine's own RA-TLS verifiers
find the quote in our certificates. Simulated evidence (development) travels in the same extension.

Client side (``verifier.ratls``, not enclave code): the certificate presented in *this*
handshake must carry evidence that verifies and whose REPORTDATA binds *this* certificate's key.

Client certificates: a data owner (or the model owner) authenticates with its Ed25519 identity. Its
certificate is issued by a name that carries its identity and is signed by the identity key; the
server trusts, for each allowed identity, an anchor certificate with that name and that public key
(``identity_anchor``). OpenSSL then accepts exactly the clients that hold an allowed identity key,
and the server reads the identity from the verified certificate's public key, never from a name.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from branchy_tee.tee.attest.providers import EvidenceSource

# Gramine's quote extension: mbedTLS is handed the bytes 06 09 2A 86 48 86 F8 4D 8A 39 06 as the OID.
RATLS_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
NOT_BEFORE = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)  # Gramine's defaults
NOT_AFTER = datetime.datetime(2030, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_SERVER_NAME = x509.Name(
    [x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "branchy-tee")]
)
MAX_EVIDENCE = 16 * 1024
# A server certificate is valid for SERVER_CERT_LIFETIME from the enclave's clock (minus CLOCK_SKEW,
# for clients whose clock is behind); serve makes a new key and certificate at every renewal (at
# most every 300 s), and clients refuse certificates that are expired, not yet valid, or valid longer.
SERVER_CERT_LIFETIME = datetime.timedelta(minutes=20)
CLOCK_SKEW = datetime.timedelta(minutes=5)


def public_key_report_data(public_key: CertificatePublicKeyTypes, settings: bytes = bytes(32)) -> bytes:
    """REPORTDATA for RA-TLS: SHA-256 of the DER SubjectPublicKeyInfo (what Gramine's verifiers check),
    then the enclave's measured settings digest (``measured.settings_binding``; zeros in Gramine's own)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest() + settings


def make_server_certificate(
    provider: EvidenceSource, now: datetime.datetime | None = None, settings: bytes = bytes(32)
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key pair and a self-signed certificate (DER) with evidence from ``provider`` that binds
    the key, valid for SERVER_CERT_LIFETIME from ``now``. The private key never leaves the enclave."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP384R1())
    evidence = provider.evidence(public_key_report_data(key.public_key(), settings))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_SERVER_NAME)
        .issuer_name(_SERVER_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SERVER_CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.UnrecognizedExtension(RATLS_QUOTE_OID, evidence), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- client certificates
def identity_name(identity_hex: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "branchy-tee identity"),
            x509.NameAttribute(NameOID.COMMON_NAME, identity_hex),
        ]
    )


def identity_anchor(identity: bytes, signer: Ed25519PrivateKey) -> bytes:
    """PEM trust anchor for one allowed identity: the anchor name and the identity's public key.

    OpenSSL does not check a trust anchor's own signature (``signer`` is any throwaway key), only that
    a client's certificate is signed by the anchor's public key, i.e. by the identity key."""
    name = identity_name(identity.hex())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(Ed25519PublicKey.from_public_bytes(identity))
        .serial_number(1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(signer, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def client_identity(cert_der: bytes | None) -> bytes | None:
    """The identity (raw Ed25519 public key) of a client certificate OpenSSL verified against the
    anchors; None without one. The certificate must also be signed by its own key: the anchor an
    allowed identity holds could otherwise certify somebody else's key."""
    if not cert_der:
        return None
    from cryptography.exceptions import InvalidSignature

    cert = x509.load_der_x509_certificate(cert_der)
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
