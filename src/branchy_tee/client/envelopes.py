"""The data owner's side of the request and result files: ``encrypt-input`` seals a request, and
``decrypt-result`` opens the enclave's answer to it (their format: ``tee.sealed.envelope``)."""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save as st_save

from branchy_tee.core.errors import IntegrityError, UsageError, shown
from branchy_tee.core.keys import key_id
from branchy_tee.tee.sealed.envelope import (
    DIGEST_RE,
    REQUEST_MAGIC,
    RESULT_MAGIC,
    RequestHeader,
    ResultHeader,
    check_inputs,
    check_request_id,
    open_envelope,
    seal_envelope,
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def seal_request(inputs: npt.ArrayLike, data_key: bytes, request_id: str | None = None) -> bytes:
    """``inputs``: a float32 array (N, C, H, W), numpy or anything that converts to one (a CPU tensor)."""
    inputs = np.ascontiguousarray(inputs)
    check_inputs(inputs, None, "inputs")
    header = RequestHeader(
        check_request_id(new_request_id() if request_id is None else request_id),
        key_id(data_key),
        int(inputs.shape[0]),
        tuple(int(n) for n in inputs.shape[1:]),
        "float32",
    )
    return seal_envelope(REQUEST_MAGIC, header.to_json(), st_save({"inputs": inputs}), data_key)


def open_result(
    data: bytes, data_key: bytes, what: str, request_sha256: str
) -> tuple[ResultHeader, list[dict[str, Any]]]:
    """(header, records) of a result, which must answer the request whose file has SHA-256
    ``request_sha256`` (see :func:`request_digest`); IntegrityError otherwise."""
    if not isinstance(request_sha256, str) or not DIGEST_RE.fullmatch(request_sha256):
        raise UsageError("a result is opened only with the digest of the request it answers (64 lower-case hex)")
    doc, payload = open_envelope(data, RESULT_MAGIC, {key_id(data_key): data_key}, what)
    h = ResultHeader.parse(doc, what)
    if not hmac.compare_digest(h.request_sha256, request_sha256):
        raise IntegrityError(
            f"{what}: answers another request (request {shown(h.request_id)} with SHA-256 "
            f"{shown(h.request_sha256, 64)}), not the one with SHA-256 {request_sha256}: "
            "a replayed or misdirected result"
        )
    try:
        records = json.loads(payload)
    except (ValueError, RecursionError):
        raise IntegrityError(f"{what}: authentic but malformed result payload") from None
    if not isinstance(records, list) or len(records) != h.samples:
        raise IntegrityError(f"{what}: result payload does not match its header")
    return h, records
