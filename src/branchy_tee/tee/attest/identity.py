"""Long-term identities of the parties: Ed25519 keys of the key brokers, the model owner and the
data owners.

An identity file is a PKCS#8 PEM private key (mode 0600, never overwritten); the identity itself is
the raw 32-byte public key, shown as 64 lower-case hex characters. Brokers sign every key-release
response with theirs; the model owner signs release statements with its; data owners authenticate
to the online service with theirs. Signatures are domain-separated by a purpose label, so a
signature made for one purpose is never valid for another.

The verify side is enclave code: standard library and ``cryptography`` only.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from branchy_tee.core.errors import BranchyError, UsageError, shown
from branchy_tee.core.fileio import TargetExists, atomic_write_bytes, read_private_file
from branchy_tee.tee.measured import identity_problem

IDENTITY_BYTES = 32
SIGNATURE_BYTES = 64
_DOMAIN = b"branchy-tee/v1 signature\0"


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def identity_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The identity as users see and pin it: 64 hex characters."""
    return public_bytes(key).hex()


def parse_identity(text: object, what: str = "identity") -> bytes:
    """A 64-hex-character identity as 32 bytes; UsageError when it is not one."""
    problem = identity_problem(text)
    if problem:
        raise UsageError(f"{what} {shown(text)} {problem}")
    return bytes.fromhex(text)  # type: ignore[arg-type]


def create_identity(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """A new identity in ``path`` (mode 0600); an existing file is never replaced."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        atomic_write_bytes(path, pem, mode=0o600, overwrite=False)
    except TargetExists:
        raise BranchyError(f"{path} already exists; refusing to overwrite an identity") from None
    except OSError as e:
        raise BranchyError(f"cannot write identity file {path}: {e.strerror or e}") from None
    return key


def load_identity(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The identity in ``path`` (a private PEM file, as ``create_identity`` writes)."""
    data = read_private_file(path, "identity file")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise BranchyError(
            f"identity file {path} is not an unencrypted PEM private key "
            "(create one with `branchy-tee keygen --identity --out FILE`)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BranchyError(f"identity file {path} does not hold an Ed25519 key")
    return key


def sign(key: Ed25519PrivateKey, purpose: bytes, message: bytes) -> bytes:
    return key.sign(_DOMAIN + purpose + b"\0" + message)


def verify(identity: bytes, purpose: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``identity``'s signature of ``message`` for ``purpose``."""
    if len(signature) != SIGNATURE_BYTES or identity_problem(identity):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(signature, _DOMAIN + purpose + b"\0" + message)
    except (InvalidSignature, ValueError):
        return False
    return True
