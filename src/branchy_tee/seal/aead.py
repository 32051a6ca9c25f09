"""Chunked AES-256-GCM (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár).

A plaintext is cut into chunks of ``chunk_size`` bytes; chunk i is sealed with nonce
``i (8 bytes) || last (1 byte) || 000`` and associated data ``context || i || last``. So a chunk
cannot be flipped, moved, dropped, duplicated or taken from another stream, and a stream cannot be
truncated at a chunk boundary (the last chunk carries the flag) or extended. Each stream must have
its own key (we derive one per stage and bundle), which makes the counter nonces unique.

Decryption streams: a chunk is verified before any of its bytes are used.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError

TAG = 16
DEFAULT_CHUNK = 1 << 20


def _nonce_and_aad(context: bytes, index: int, last: bool) -> tuple[bytes, bytes]:
    suffix = struct.pack(">QB", index, 1 if last else 0)
    return suffix + b"\0\0\0", context + suffix


def num_chunks(plaintext_size: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_size // chunk_size))


def sealed_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG * num_chunks(plaintext_size, chunk_size)


def seal_chunks(key: bytes, plaintext: bytes | memoryview, context: bytes, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """Yield the sealed chunks of ``plaintext`` (an empty plaintext gives one empty last chunk)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    aead = AESGCM(key)
    view = memoryview(plaintext)
    n = num_chunks(len(view), chunk_size)
    for i in range(n):
        nonce, aad = _nonce_and_aad(context, i, i == n - 1)
        yield aead.encrypt(nonce, bytes(view[i * chunk_size : (i + 1) * chunk_size]), aad)


def open_chunks(key: bytes, f: BinaryIO, context: bytes, plaintext_size: int, chunk_size: int, what: str) -> bytearray:
    """Read, verify and decrypt a whole stream of known size from ``f`` into one buffer.

    ``what`` names the stream in errors. Raises IntegrityError on any change: a flipped bit, a
    missing, moved or foreign chunk, a truncated or extended file.
    """
    aead = AESGCM(key)
    out = bytearray(plaintext_size)
    n = num_chunks(plaintext_size, chunk_size)
    for i in range(n):
        last = i == n - 1
        want = (plaintext_size - i * chunk_size if last else chunk_size) + TAG
        sealed = f.read(want)
        if len(sealed) != want:
            raise IntegrityError(f"{what}: truncated (chunk {i} of {n} is {len(sealed)} bytes, expected {want})")
        nonce, aad = _nonce_and_aad(context, i, last)
        try:
            chunk = aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise IntegrityError(f"{what}: chunk {i} failed authentication (tampered, reordered, foreign or wrong key)") from None
        out[i * chunk_size : i * chunk_size + len(chunk)] = chunk
    if f.read(1):
        raise IntegrityError(f"{what}: unexpected data after the last chunk")
    return out
