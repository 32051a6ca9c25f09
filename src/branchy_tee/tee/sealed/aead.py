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
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from branchy_tee.core.errors import IntegrityError

TAG = 16
DEFAULT_CHUNK = 1 << 20

# What a stream is opened into: a plain buffer, or an anonymous mapping for large stages.
PlainBuffer = bytearray | mmap.mmap


class ChunkReader(Protocol):
    """What sealed chunks are read from: a binary file (buffered or not) or an in-memory stream."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def nonce_and_aad(context: bytes, index: int, last: bool) -> tuple[bytes, bytes]:
    suffix = struct.pack(">QB", index, 1 if last else 0)
    return suffix + b"\0\0\0", context + suffix


def num_chunks(plaintext_size: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_size // chunk_size))


def sealed_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG * num_chunks(plaintext_size, chunk_size)


def _fresh_buffer(size: int) -> PlainBuffer:
    """A zeroed, writable buffer. Large ones are their own anonymous mapping, so the memory goes back
    to the system as soon as the stage using it is dropped. Pages are faulted in by the decryption
    threads as they write, not populated up front; no huge pages, whose compaction made cold starts
    erratic (BENCHMARKS.md, "Runtime choices")."""
    if size >= 1 << 20 and hasattr(mmap, "MAP_ANONYMOUS"):
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:
            pass
    return bytearray(size)


MAX_DECRYPT_WORKERS = 4  # the enclave's thread count (enclave/build.py) and size rule allow for these


def _decrypt_workers() -> int:
    """Decryption threads: AES-GCM in ``cryptography`` releases the GIL, so chunks decrypt in
    parallel (2 cores here: 2.3 -> 3.2 GB/s). A few are enough; reading is sequential anyway. No
    more than the compute threads the runtime was given (OMP_NUM_THREADS, set in the enclave)."""
    limit = os.cpu_count() or 1
    try:
        limit = min(limit, int(os.environ.get("OMP_NUM_THREADS", "") or limit))
    except ValueError:
        pass
    return max(1, min(MAX_DECRYPT_WORKERS, limit))


def _wipe(view: memoryview, step: int = 1 << 20) -> None:
    zeros = bytes(min(step, len(view)))
    for i in range(0, len(view), step):
        n = min(step, len(view) - i)
        view[i : i + n] = zeros[:n]


def open_chunks(
    key: bytes,
    f: ChunkReader,
    context: bytes,
    plaintext_size: int,
    chunk_size: int,
    what: str,
    into: PlainBuffer | None = None,
) -> PlainBuffer:
    """Read, verify and decrypt a whole stream of known size from ``f`` into one buffer (``into``,
    or a fresh one), which is returned.

    ``what`` names the stream in errors. Raises IntegrityError on any change: a flipped bit, a
    missing, moved or foreign chunk, a truncated or extended file. The file is read in order, one
    chunk at a time; while the next chunk is read, earlier ones are decrypted and verified on other
    threads, each straight into its place in the output. Errors are reported for the first bad chunk.
    AES-GCM's ``decrypt_into`` writes a chunk's plaintext before it checks the tag, so on any
    failure the whole output is wiped before the error is raised: no unverified byte survives.
    """
    out = _fresh_buffer(plaintext_size) if into is None else into
    if len(out) != plaintext_size:
        raise ValueError("the output buffer must have the plaintext's size")
    stream = _Stream(AESGCM(key), context, memoryview(out), chunk_size, what)
    try:
        stream.read_all(f)
    except BaseException:
        _wipe(stream.view)
        raise
    return out


class _Stream:
    """One stream being opened: the reading thread reads chunk after chunk into a ring of buffers
    (one per chunk in flight: no per-chunk allocation) and decrypts its share; workers decrypt the
    rest. Outcomes are kept in chunk order, so the first bad chunk is the one reported."""

    def __init__(self, aead: AESGCM, context: bytes, view: memoryview, chunk_size: int, what: str):
        self.aead, self.context, self.view, self.chunk_size, self.what = aead, context, view, chunk_size, what
        self.size = len(view)
        self.n = num_chunks(self.size, chunk_size)
        self.workers = _decrypt_workers() if self.n >= 4 else 1
        self.ring = [memoryview(bytearray(min(self.size, chunk_size) + TAG)) for _ in range(self.workers + 1)]
        self.pending: deque[Future[None]] = deque()  # in chunk order

    def decrypt(self, i: int, sealed: memoryview, size: int, last: bool) -> None:
        nonce, aad = nonce_and_aad(self.context, i, last)
        try:
            self.aead.decrypt_into(nonce, sealed, aad, self.view[i * self.chunk_size : i * self.chunk_size + size])
        except InvalidTag:
            raise IntegrityError(
                f"{self.what}: chunk {i} failed authentication (tampered, reordered, foreign or wrong key)"
            ) from None

    def inline(self, i: int, sealed: memoryview, size: int, last: bool) -> Future[None]:
        """Decrypt on this thread; the outcome kept like a worker's, so errors surface in chunk order."""
        fut: Future[None] = Future()
        try:
            self.decrypt(i, sealed, size, last)
            fut.set_result(None)
        except IntegrityError as e:
            fut.set_exception(e)
        return fut

    def read_all(self, f: ChunkReader) -> None:
        pool = ThreadPoolExecutor(self.workers - 1) if self.workers > 1 else None
        try:
            for i in range(self.n):
                pool = self._read_one(f, i, pool)
            while self.pending:
                self.pending.popleft().result()
            if f.read(1):
                raise IntegrityError(f"{self.what}: unexpected data after the last chunk")
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _read_one(self, f: ChunkReader, i: int, pool: ThreadPoolExecutor | None) -> ThreadPoolExecutor | None:
        last = i == self.n - 1
        size = self.size - i * self.chunk_size if last else self.chunk_size
        if len(self.pending) == len(self.ring):  # the oldest chunk's buffer is needed again
            self.pending.popleft().result()
        sealed = self.ring[i % len(self.ring)][: size + TAG]
        got = f.readinto(sealed)
        if got != size + TAG:
            for fut in self.pending:  # a bad earlier chunk is the first error
                fut.result()
            raise IntegrityError(
                f"{self.what}: truncated (chunk {i} of {self.n} is {got or 0} bytes, expected {size + TAG})"
            )
        if pool is None or i % self.workers == 0:  # the reading thread takes its share too
            self.pending.append(self.inline(i, sealed, size, last))
            return pool
        try:
            self.pending.append(pool.submit(self.decrypt, i, sealed, size, last))
        except RuntimeError:  # no thread to be had (an enclave's thread slots are few): go on alone
            pool.shutdown(wait=True)
            pool = None
            self.pending.append(self.inline(i, sealed, size, last))
        return pool
