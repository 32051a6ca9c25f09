"""Attested TLS in Gramine's RA-TLS form, and client certificates made from party identities.

Server (enclave) side, as Gramine's ``ra_tls_create_key_and_crt_der`` does it: a fresh ECDSA P-384
key pair, evidence whose REPORTDATA is SHA-256(the DER SubjectPublicKeyInfo of that key) || 0^32,
and a self-signed certificate carrying the evidence as a non-critical X.509 extension. The
extension's OID is the one Gramine writes (the bytes of its ``NON_STANDARD_INTEL_SGX_QUOTE_OID``
taken as the OID's content, i.e. ``0.6.9.42.840.113741.1337.6``), so Gramine's own RA-TLS verifiers
find the quote in our certificates. Simulated evidence (development) travels in the same extension.

Client side (:func:`verify_server_certificate`): the certificate presented in *this* handshake must
carry evidence that verifies (DCAP quote chain and signatures, or the simulated document) and whose
REPORTDATA binds *this* certificate's public key; then the data owner's own policy judges the claims.

Client certificates: a data owner (or the model owner) authenticates with its Ed25519 identity. Its
certificate is issued by a name that carries its identity and is signed by the identity key; the
server trusts, for each allowed identity, an anchor certificate with that name and that public key
(``identity_anchor``). OpenSSL then accepts exactly the clients that hold an allowed identity key,
and the server reads the identity from the verified certificate's public key, never from a name.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ..errors import AttestationError

# Gramine's quote extension: mbedTLS is handed the bytes 06 09 2A 86 48 86 F8 4D 8A 39 06 as the OID.
RATLS_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
_NOT_BEFORE = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)  # Gramine's defaults
_NOT_AFTER = datetime.datetime(2030, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_SERVER_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "branchy-tee")])  # fmt: skip
MAX_EVIDENCE = 16 * 1024


def public_key_report_data(public_key) -> bytes:
    """REPORTDATA for RA-TLS: SHA-256 of the DER SubjectPublicKeyInfo, then 32 zero bytes."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest() + bytes(32)


def make_server_certificate(provider) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key pair and a self-signed certificate (DER) with evidence from ``provider`` that binds
    the key. The private key never leaves the enclave."""
    key = ec.generate_private_key(ec.SECP384R1())
    evidence = provider.evidence(public_key_report_data(key.public_key()))
    cert = (x509.CertificateBuilder()
            .subject_name(_SERVER_NAME).issuer_name(_SERVER_NAME)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .add_extension(x509.UnrecognizedExtension(RATLS_QUOTE_OID, evidence), critical=False)
            .sign(key, hashes.SHA256()))  # fmt: skip
    return key, cert.public_bytes(serialization.Encoding.DER)


def evidence_of(cert_der: bytes) -> tuple[str, bytes, bytes]:
    """(evidence type, evidence, the report data this certificate's key requires); AttestationError
    when the certificate is not an RA-TLS certificate."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        ext = cert.extensions.get_extension_for_oid(RATLS_QUOTE_OID).value
        evidence = ext.value
        expected = public_key_report_data(cert.public_key())
    except x509.ExtensionNotFound:
        raise AttestationError("the server's certificate carries no attestation evidence (not an RA-TLS certificate)") from None
    except (ValueError, TypeError):
        raise AttestationError("the server's certificate cannot be parsed") from None
    if not 0 < len(evidence) <= MAX_EVIDENCE:
        raise AttestationError("the server's attestation evidence has an impossible size")
    kind = "simulated" if evidence[:1] == b"{" else "dcap"
    return kind, evidence, expected


def verify_server_certificate(cert_der: bytes, policy, *, now=None):
    """Verify an RA-TLS certificate against a data owner's policy; return the enclave's claims.

    The evidence must verify, bind this certificate's public key in its REPORTDATA, and satisfy the
    policy (measurement, TCB status with the policy's collateral, debug, simulation only if allowed).
    """
    import hmac

    from ..errors import PolicyError
    from .broker import verify_evidence

    kind, evidence, expected = evidence_of(cert_der)
    claims = verify_evidence(policy, kind, evidence, now=now)
    if not hmac.compare_digest(claims.report_data, expected):
        raise AttestationError("the server's evidence does not bind the key of the certificate it presented "
                               "(REPORTDATA is not SHA-256 of its public key): evidence copied from another server")
    try:
        policy.evaluate(claims)
    except PolicyError as e:
        raise AttestationError(f"the server's enclave is refused by your policy: {e}") from None
    return claims


# --------------------------------------------------------------------------- client certificates
def _identity_name(identity_hex: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "branchy-tee identity"),
                      x509.NameAttribute(NameOID.COMMON_NAME, identity_hex)])  # fmt: skip


def client_certificate(identity: Ed25519PrivateKey) -> bytes:
    """PEM certificate for TLS client authentication with an identity: its key is the identity key,
    issued by the identity's anchor name and signed by the identity key itself."""
    public = identity.public_key()
    hex_id = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "branchy-tee client")]))
            .issuer_name(_identity_name(hex_id))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(identity, None))  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def identity_anchor(identity: bytes, signer: Ed25519PrivateKey) -> bytes:
    """PEM trust anchor for one allowed identity: the anchor name and the identity's public key.

    OpenSSL does not check a trust anchor's own signature (``signer`` is any throwaway key), only that
    a client's certificate is signed by the anchor's public key, i.e. by the identity key."""
    name = _identity_name(identity.hex())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(Ed25519PublicKey.from_public_bytes(identity)).serial_number(1)
            .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(signer, None))  # fmt: skip
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
