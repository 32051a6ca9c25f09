"""The data owner's TLS side: the client certificate made from its identity key, in a TLS 1.3
context whose server certificate is judged by its attestation, after the handshake."""

from __future__ import annotations

import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from branchy_tee.tee.attest.ratls import NOT_AFTER, NOT_BEFORE, identity_name


def anonymous_context() -> ssl.SSLContext:
    """TLS 1.3 without a client certificate, accepting any server certificate: for the first
    handshake, whose certificate is then judged by its attestation (and nothing is sent on it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(identity, server_cert_der: bytes) -> ssl.SSLContext:
    """TLS 1.3, the data owner's identity as client certificate, and exactly one trusted server
    certificate: the one whose attestation was verified. OpenSSL sends the identity only after the
    server proved it holds that certificate's key, so no other server ever sees the identity."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the pinned certificate is the server's name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=server_cert_der)
    key_pem = identity.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    d = tempfile.mkdtemp(prefix="branchy-tee-client-")  # the ssl module loads keys only from files
    try:
        path = os.path.join(d, "identity.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + client_certificate(identity))
        ctx.load_cert_chain(path)
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    return ctx


def client_certificate(identity: Ed25519PrivateKey) -> bytes:
    """PEM certificate for TLS client authentication with an identity: its key is the identity key,
    issued by the identity's anchor name and signed by the identity key itself."""
    public = identity.public_key()
    hex_id = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "branchy-tee client")]))
        .issuer_name(identity_name(hex_id))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(identity, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)
