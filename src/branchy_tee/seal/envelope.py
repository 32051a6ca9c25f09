"""Encrypted requests (inputs from a data owner) and results (answers back to that data owner).

One file each:  MAGIC (8) | header length (u32, big endian) | header (canonical JSON) | nonce (12) | ciphertext+tag

The header is authenticated as associated data and names the request id and the data owner's key id
(so the enclave knows which key opens it, and nobody can relabel it). The AES-256-GCM key is derived
from the data owner's key and the request id, and differs between requests and results, so a result
can only be opened as the result of the request it answers.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
import uuid
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..errors import BranchyError, IntegrityError
from .bundle import canonical_json
from .keys import derive, key_id

REQUEST_MAGIC = b"BTEEREQ1"
RESULT_MAGIC = b"BTEERES1"
MAX_HEADER = 64 * 1024
NONCE = 12
MAX_FILE = 1 << 30  # largest request or result file read (1 GiB)


@dataclass
class Envelope:
    header: dict
    payload: bytes


def new_request_id() -> str:
    return uuid.uuid4().hex


def _key(data_key: bytes, magic: bytes, request_id: str) -> bytes:
    purpose = "request" if magic == REQUEST_MAGIC else "result"
    return derive(data_key, purpose, request_id.encode())


def seal_envelope(magic: bytes, header: dict, payload: bytes, data_key: bytes) -> bytes:
    header = {**header, "key_id": key_id(data_key)}
    hbytes = canonical_json(header)
    prefix = magic + struct.pack(">I", len(hbytes)) + hbytes
    nonce = secrets.token_bytes(NONCE)
    return prefix + nonce + AESGCM(_key(data_key, magic, header["request_id"])).encrypt(nonce, payload, prefix)


def read_envelope_header(data: bytes, magic: bytes, what: str) -> tuple[dict, int]:
    """(header, offset of the nonce) without decrypting; the header is not yet authenticated."""
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
    if not isinstance(header, dict) or not isinstance(header.get("request_id"), str) or not isinstance(header.get("key_id"), str):
        raise IntegrityError(f"{what}: {kind} header lacks a request id or key id")
    return header, 12 + n


def open_envelope(data: bytes, magic: bytes, keys: dict[str, bytes], what: str) -> Envelope:
    """Authenticate and decrypt with the key whose id the header names (``keys``: key id -> key)."""
    header, off = read_envelope_header(data, magic, what)
    key = keys.get(header["key_id"])
    if key is None:
        known = ", ".join(sorted(keys)) or "none"
        raise IntegrityError(f"{what}: sealed for data key id {header['key_id']}, which this run has no key for (have: {known})")
    nonce, body = data[off : off + NONCE], data[off + NONCE :]
    try:
        payload = AESGCM(_key(key, magic, header["request_id"])).decrypt(nonce, body, data[:off])
    except InvalidTag:
        raise IntegrityError(f"{what}: failed authentication (tampered, or not sealed with this data key)") from None
    return Envelope(header, payload)


def read_file(path: str | os.PathLike, what: str | None = None, limit: int = MAX_FILE) -> bytes:
    """A request or result file's bytes: a regular file of at most ``limit`` bytes (checked before
    reading, so a huge or endless file, e.g. /dev/zero, is refused instead of exhausting memory)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore the flag)
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BranchyError(f"{path}: not a regular file")
            if st.st_size > limit:
                raise BranchyError(f"{path}: {st.st_size} bytes, over the {limit}-byte limit for a request or result file")
            data = f.read(st.st_size + 1)  # not read(limit): that would allocate the limit up front
    except FileNotFoundError:
        raise BranchyError(f"{path}: file not found") from None
    except OSError as e:
        raise BranchyError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > st.st_size:
        raise BranchyError(f"{path}: the file grew while it was read")
    return data


# --------------------------------------------------------------------------- requests
def seal_request(inputs, data_key: bytes, request_id: str | None = None) -> bytes:
    """``inputs``: a float32 array (N, C, H, W), numpy or anything that converts to one (a CPU tensor)."""
    inputs = np.ascontiguousarray(inputs)
    check_inputs(inputs, None, "inputs")
    header = {"format": "branchy-tee/request/v1", "request_id": request_id or new_request_id(),
              "samples": int(inputs.shape[0]), "shape": list(inputs.shape[1:]), "dtype": "float32"}
    return seal_envelope(REQUEST_MAGIC, header, st_save({"inputs": inputs}), data_key)


def check_inputs(x: np.ndarray, shape, what: str) -> None:
    if x.dtype != np.float32:
        raise BranchyError(f"{what}: tensor dtype is {x.dtype}, expected float32")
    if x.ndim != 4 or (shape is not None and list(x.shape[1:]) != list(shape)):
        want = f"(N, {', '.join(map(str, shape))})" if shape is not None else "(N, C, H, W)"
        raise BranchyError(f"{what}: tensor shape {tuple(x.shape)} does not match the model's input {want}")
    if x.shape[0] == 0:
        raise BranchyError(f"{what}: the request holds no samples")
    if not np.isfinite(x).all():
        raise BranchyError(f"{what}: inputs contain NaN or infinite values")


def open_request(data: bytes, keys: dict[str, bytes], input_shape, what: str) -> tuple[dict, np.ndarray]:
    env = open_envelope(data, REQUEST_MAGIC, keys, what)
    try:
        tensors = st_load(env.payload)
    except Exception:
        raise BranchyError(f"{what}: authentic but not a tensor payload") from None
    x = tensors.get("inputs")
    if x is None or len(tensors) != 1:
        raise BranchyError(f"{what}: payload must hold exactly one tensor named 'inputs'")
    check_inputs(x, input_shape, what)
    if env.header.get("samples") != x.shape[0]:
        raise BranchyError(f"{what}: header says {env.header.get('samples')} samples, payload holds {x.shape[0]}")
    return env.header, x


# --------------------------------------------------------------------------- results
def seal_result(records: list[dict], request_header: dict, data_key: bytes) -> bytes:
    header = {"format": "branchy-tee/result/v1", "request_id": request_header["request_id"], "samples": len(records)}
    return seal_envelope(RESULT_MAGIC, header, json.dumps(records).encode(), data_key)


def open_result(data: bytes, data_key: bytes, what: str, request_id: str | None = None) -> tuple[dict, list[dict]]:
    env = open_envelope(data, RESULT_MAGIC, {key_id(data_key): data_key}, what)
    if request_id is not None and env.header["request_id"] != request_id:
        raise IntegrityError(f"{what}: answers request {env.header['request_id']}, not {request_id}")
    try:
        records = json.loads(env.payload)
    except (ValueError, RecursionError):
        raise IntegrityError(f"{what}: authentic but malformed result payload") from None
    if not isinstance(records, list) or len(records) != env.header.get("samples"):
        raise IntegrityError(f"{what}: result payload does not match its header")
    return env.header, records
