"""256-bit keys, their public ids, and HKDF separation of every purpose a key is used for.

A key file holds the 32 raw key bytes (mode 0600). A key's id is derived from the key by HKDF, so it
can be shown and logged while revealing nothing about the key; it tells which key a file was sealed for.
"""

from __future__ import annotations

import re
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")  # what key_id() returns
_DOMAIN = b"branchy-tee/v1 "


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def derive(key: bytes, purpose: str, context: bytes = b"", length: int = 32) -> bytes:
    """A subkey for one purpose and context: keys for different uses are independent."""
    if len(key) != KEY_BYTES:
        raise ValueError("keys are 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=_DOMAIN + purpose.encode() + b"\0" + context
    ).derive(key)


def key_id(key: bytes) -> str:
    """16 hex characters naming the key (not secret)."""
    return derive(key, "key-id", length=8).hex()
