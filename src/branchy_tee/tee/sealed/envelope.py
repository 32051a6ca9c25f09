"""Encrypted requests (inputs from a data owner) and results (answers back to that data owner).

One file each:  MAGIC (8) | header length (u32, big endian) | header (canonical JSON) | nonce (12) | ciphertext+tag

The header is authenticated as associated data and names the request id and the data owner's key id
(so the enclave knows which key opens it, and nobody can relabel it). The AES-256-GCM key is derived
from the data owner's key and the request id, and differs between requests and results.

A result's header also carries the SHA-256 of the request file it answers (``request_sha256``) and
the model that answered it (bundle id, model version, model key id). A data owner opens a result
only together with its request (or that request's digest), so an old result replayed for a new
request with the same request id is refused, and it learns which sealed model answered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import load as st_load

from branchy_tee.core.errors import BranchyError, IntegrityError, UsageError, shown
from branchy_tee.core.fileio import read_regular_file
from branchy_tee.core.keys import KEY_ID_RE, derive, key_id
from branchy_tee.core.strict import Fields, canonical_json
from branchy_tee.tee.sealed.header import ModelRef

REQUEST_MAGIC = b"BTEEREQ1"
RESULT_MAGIC = b"BTEERES1"
REQUEST_FORMAT = "branchy-tee/request/v1"
RESULT_FORMAT = "branchy-tee/result/v2"
MAX_REQUEST_ID = 128
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_HEADER = 64 * 1024
NONCE = 12
MAX_FILE = 1 << 30  # largest request or result file read (1 GiB)


def request_id_problem(request_id: object) -> str | None:
    """Why ``request_id`` cannot be a request id (None when it can): 1-128 printable characters of
    valid Unicode (no lone surrogates: the id is encoded into key derivations and shown in logs)."""
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID:
        return f"must be 1 to {MAX_REQUEST_ID} characters"
    try:
        request_id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if not request_id.isprintable():
        return "must be printable text"
    return None


def check_request_id(request_id: object) -> str:
    problem = request_id_problem(request_id)
    if problem:
        raise UsageError(f"request id {shown(request_id)} {problem}")
    return request_id  # type: ignore[return-value]


def _is_key_id(v: str) -> bool:
    return KEY_ID_RE.fullmatch(v) is not None


def _is_request_id(v: str) -> bool:
    return request_id_problem(v) is None


@dataclass(frozen=True)
class RequestHeader:
    """A request's authenticated header: which request, under which data key, and what it holds."""

    request_id: str
    key_id: str  # the data owner's key id
    samples: int
    shape: tuple[int, ...]  # one input's (C, H, W)
    dtype: str  # the payload's tensor type as the sender says it (the payload itself is checked)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REQUEST_FORMAT,
            "request_id": self.request_id,
            "samples": self.samples,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "key_id": self.key_id,
        }

    @classmethod
    def parse(cls, doc: object, what: str) -> "RequestHeader":
        f = Fields(doc, what, "the request header", IntegrityError)
        f.text("format", lambda v: v == REQUEST_FORMAT, REQUEST_FORMAT)
        h = cls(
            f.text("request_id", _is_request_id, "a request id"),
            f.text("key_id", _is_key_id, "a key id"),
            f.integer("samples", 0),
            f.integers("shape", lo=0),
            f.text("dtype"),
        )
        f.done()
        return h


@dataclass(frozen=True)
class ResultHeader:
    """A result's authenticated header: the request it answers (its id and its file's SHA-256) and
    the sealed model that answered."""

    request_id: str
    request_sha256: str
    model: ModelRef
    samples: int
    key_id: str  # the data owner's key id

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "request_id": self.request_id,
            "request_sha256": self.request_sha256,
            **self.model.to_json(),
            "samples": self.samples,
            "key_id": self.key_id,
        }

    @classmethod
    def parse(cls, doc: object, what: str) -> "ResultHeader":
        f = Fields(doc, what, "the result header", IntegrityError)
        if f.doc.get("format") != RESULT_FORMAT:
            raise IntegrityError(f"{what}: authentic, but not a {RESULT_FORMAT} result (no request digest or model)")
        f.text("format")
        h = cls(
            f.text("request_id", _is_request_id, "a request id"),
            f.text("request_sha256", lambda v: DIGEST_RE.fullmatch(v) is not None, "a SHA-256 (64 lower-case hex)"),
            ModelRef(
                f.text("bundle_id"), f.integer("model_version", 1), f.text("model_key_id", _is_key_id, "a key id")
            ),
            f.integer("samples", 0),
            f.text("key_id", _is_key_id, "a key id"),
        )
        f.done()
        return h


def request_digest(envelope: bytes) -> str:
    """The SHA-256 (hex) of a request file's bytes: what its result binds."""
    return hashlib.sha256(envelope).hexdigest()


def _key(data_key: bytes, magic: bytes, request_id: str) -> bytes:
    purpose = "request" if magic == REQUEST_MAGIC else "result"
    return derive(data_key, purpose, request_id.encode())


def seal_envelope(magic: bytes, header: dict[str, Any], payload: bytes, data_key: bytes) -> bytes:
    """Seal ``payload`` under ``header`` (a typed header's ``to_json()``; the data key's id is set here)."""
    header = {**header, "key_id": key_id(data_key)}
    hbytes = canonical_json(header)
    prefix = magic + struct.pack(">I", len(hbytes)) + hbytes
    nonce = secrets.token_bytes(NONCE)
    return prefix + nonce + AESGCM(_key(data_key, magic, header["request_id"])).encrypt(nonce, payload, prefix)


def read_envelope_header(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], int]:
    """(header, offset of the nonce) without decrypting. The header is not yet authenticated: only
    its request id and key id (which key opens it) are checked here, and nothing else is read from it
    before it is authenticated (``open_envelope``)."""
    kind = "request" if magic == REQUEST_MAGIC else "result"
    if len(data) < len(magic) + 4 or data[: len(magic)] != magic:
        raise IntegrityError(f"{what}: not a branchy-tee {kind} file")
    (n,) = struct.unpack(">I", data[8:12])
    if n > MAX_HEADER or 12 + n + NONCE + 16 > len(data):
        raise IntegrityError(f"{what}: truncated or malformed {kind} header")
    try:
        header = json.loads(data[12 : 12 + n])
    except (ValueError, RecursionError):  # also nesting too deep, integers too long
        raise IntegrityError(f"{what}: {kind} header is not valid JSON") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("request_id"), str)
        or not isinstance(header.get("key_id"), str)
    ):
        raise IntegrityError(f"{what}: {kind} header lacks a request id or key id")
    if not KEY_ID_RE.fullmatch(header["key_id"]):
        raise IntegrityError(f"{what}: {kind} header's key id {shown(header['key_id'], 40)} is not a key id")
    problem = request_id_problem(header["request_id"])
    if problem:
        raise IntegrityError(f"{what}: {kind} header's request id {shown(header['request_id'])} {problem}")
    return header, 12 + n


def request_key_id(data: bytes, what: str) -> str:
    """The data key id a request says it is sealed under (unauthenticated: it says which key to try)."""
    kid: str = read_envelope_header(data, REQUEST_MAGIC, what)[0]["key_id"]  # checked to be a key id
    return kid


def open_envelope(data: bytes, magic: bytes, keys: dict[str, bytes], what: str) -> tuple[dict[str, Any], bytes]:
    """(header, payload), authenticated and decrypted with the key whose id the header names
    (``keys``: key id -> key). The header is as read: its type's ``parse`` reads it next."""
    header, off = read_envelope_header(data, magic, what)
    key = keys.get(header["key_id"])
    if key is None:
        known = ", ".join(sorted(keys)) or "none"
        raise IntegrityError(
            f"{what}: sealed for data key id {shown(header['key_id'], 40)}, which this run has no key for "
            f"(have: {known})"
        )
    nonce, body = data[off : off + NONCE], data[off + NONCE :]
    try:
        payload = AESGCM(_key(key, magic, header["request_id"])).decrypt(nonce, body, data[:off])
    except InvalidTag:
        raise IntegrityError(f"{what}: failed authentication (tampered, or not sealed with this data key)") from None
    return header, payload


def read_file(path: str | os.PathLike[str], what: str = "request or result file", limit: int = MAX_FILE) -> bytes:
    """A request or result file's bytes: a regular file of at most ``limit`` bytes (checked before
    reading, so a huge or endless file, e.g. /dev/zero, is refused instead of exhausting memory)."""
    return read_regular_file(path, what, limit)


def check_inputs(x: np.ndarray, shape: Sequence[int] | None, what: str) -> None:
    if x.dtype != np.float32:
        raise BranchyError(f"{what}: tensor dtype is {x.dtype}, expected float32")
    if x.ndim != 4 or (shape is not None and list(x.shape[1:]) != list(shape)):
        want = f"(N, {', '.join(map(str, shape))})" if shape is not None else "(N, C, H, W)"
        raise BranchyError(f"{what}: tensor shape {tuple(x.shape)} does not match the model's input {want}")
    if x.shape[0] == 0:
        raise BranchyError(f"{what}: the request holds no samples")
    if not np.isfinite(x).all():
        raise BranchyError(f"{what}: inputs contain NaN or infinite values")


def open_request(
    data: bytes, keys: dict[str, bytes], input_shape: Sequence[int] | None, what: str
) -> tuple[RequestHeader, np.ndarray]:
    doc, payload = open_envelope(data, REQUEST_MAGIC, keys, what)
    header = RequestHeader.parse(doc, what)
    try:
        tensors = st_load(payload)
    except Exception:
        raise BranchyError(f"{what}: authentic but not a tensor payload") from None
    x = tensors.get("inputs")
    if x is None or len(tensors) != 1:
        raise BranchyError(f"{what}: payload must hold exactly one tensor named 'inputs'")
    check_inputs(x, input_shape, what)
    if header.samples != x.shape[0]:
        raise BranchyError(f"{what}: header says {header.samples} samples, payload holds {x.shape[0]}")
    return header, x


def seal_result(
    records: list[dict[str, Any]], request: RequestHeader, request_sha256: str, model: ModelRef, data_key: bytes
) -> bytes:
    """The sealed answer to one request: bound to that request's exact bytes (``request_sha256``) and
    naming the model that answered."""
    header = ResultHeader(request.request_id, request_sha256, model, len(records), key_id(data_key))
    return seal_envelope(RESULT_MAGIC, header.to_json(), json.dumps(records).encode(), data_key)
