"""Chunked AES-256-GCM (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár).

A plaintext is cut into chunks of ``chunk_size`` bytes; chunk i is sealed with nonce
``i (8 bytes) || last (1 byte) || 000`` and associated data ``context || i || last``. So a chunk
cannot be flipped, moved, dropped, duplicated or taken from another stream, and a stream cannot be
truncated at a chunk boundary (the last chunk carries the flag) or extended. Each stream must have
its own key (we derive one per stage and bundle), which makes the counter nonces unique.

Decryption streams: a chunk is verified before any of its bytes are used.
"""

from __future__ import annotations

import mmap
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


def _fresh_buffer(size: int):
    """A zeroed, writable buffer. Large ones are their own mapping, populated up front: the kernel
    maps all pages in one call (about twice as fast here as taking one fault per 4 KiB page while
    decrypting), and the memory goes back to the system as soon as the stage using it is dropped."""
    if size >= 1 << 20 and hasattr(mmap, "MAP_POPULATE"):
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        except OSError:
            pass
    return bytearray(size)


def open_chunks(key: bytes, f: BinaryIO, context: bytes, plaintext_size: int, chunk_size: int, what: str, into=None):
    """Read, verify and decrypt a whole stream of known size from ``f`` into one buffer (``into``,
    or a fresh one), which is returned.

    ``what`` names the stream in errors. Raises IntegrityError on any change: a flipped bit, a
    missing, moved or foreign chunk, a truncated or extended file.
    """
    aead = AESGCM(key)
    out = _fresh_buffer(plaintext_size) if into is None else into
    if len(out) != plaintext_size:
        raise ValueError("the output buffer must have the plaintext's size")
    view = memoryview(out)
    # One reusable input buffer and decryption straight into the output: no per-chunk allocation.
    inbuf = memoryview(bytearray(min(plaintext_size, chunk_size) + TAG))
    n = num_chunks(plaintext_size, chunk_size)
    for i in range(n):
        last = i == n - 1
        size = plaintext_size - i * chunk_size if last else chunk_size
        sealed = inbuf[: size + TAG]
        got = f.readinto(sealed)
        if got != size + TAG:
            raise IntegrityError(f"{what}: truncated (chunk {i} of {n} is {got or 0} bytes, expected {size + TAG})")
        nonce, aad = _nonce_and_aad(context, i, last)
        try:
            aead.decrypt_into(nonce, sealed, aad, view[i * chunk_size : i * chunk_size + size])
        except InvalidTag:
            raise IntegrityError(f"{what}: chunk {i} failed authentication (tampered, reordered, foreign or wrong key)") from None
    if f.read(1):
        raise IntegrityError(f"{what}: unexpected data after the last chunk")
    return out
