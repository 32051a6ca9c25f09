"""The sealed model bundle: a directory with an authenticated plaintext header and one encrypted
file per stage.

    model.btee/
      header.json       {"header": {...}, "mac": "<HMAC-SHA256 over the canonical header JSON>"}
      stage-00.bin      chunked AES-256-GCM of stage 0's payload: its ONNX graph (the stage and exit
                        head 0), then the graph's weights in one aligned blob (export.payload)
      stage-01.bin      ...

Keys (all derived from the model key with HKDF): the header MAC key is bound to the bundle id; each
stage's key is bound to (bundle id, model version, stage index), and every chunk's nonce and
associated data also carry them. A fresh random bundle id per seal means that stage files swapped
between bundles, or between versions of one model, fail authentication; a replayed older bundle is
authentic but is refused below the minimum model version.

The header is plaintext on purpose: data owners read the preprocessing from it without the model
key. It reveals the architecture, class names and thresholds, not the weights.

What is sealed is what the owner evaluated and calibrated: the stage graphs exported into the run
directory (``export.onnx``), each packed into its payload by the same deterministic function that
``eval`` and ``calibrate`` load them through. The enclave builds each stage's ONNX Runtime session
from the decrypted payload in memory, using the weights where they were decrypted (``tee.graphs``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchy_tee.core.errors import BranchyError, IntegrityError, shown
from branchy_tee.core.fileio import read_regular_file
from branchy_tee.core.keys import derive, key_id
from branchy_tee.core.strict import canonical_json
from branchy_tee.tee.sealed import aead
from branchy_tee.tee.sealed.header import (
    BUNDLE_FORMAT,
    HEADER_MEMBERS,
    STAGE_MEMBERS,
    BundleHeader,
)

if TYPE_CHECKING:
    pass

HEADER_FILE = "header.json"
MAX_HEADER_BYTES = 1 << 20
# header.json holds exactly these members, in this order (as seal_model writes them), and so do the
# header and its stage entries: anything else is refused (with the model key at hand, after the MAC:
# a change anywhere in the header is reported as tampering).
DOC_MEMBERS = ("header", "mac")


def stage_context(bundle_id: str, version: int, index: int) -> bytes:
    return f"stage|{bundle_id}|{version}|{index}|".encode()


def stage_key(model_key: bytes, bundle_id: str, version: int, index: int) -> bytes:
    return derive(model_key, "bundle-stage", stage_context(bundle_id, version, index))


def header_mac(model_key: bytes, header: dict[str, Any]) -> str:
    """The MAC of a header object, exactly as read or about to be written (not a re-serialisation)."""
    mac_key = derive(model_key, "bundle-header", str(header.get("bundle_id", "")).encode())
    return hmac.new(mac_key, canonical_json(header), hashlib.sha256).hexdigest()


def header_file_bytes(doc: dict[str, Any]) -> bytes:
    """The exact bytes of header.json for a header document (what ``seal_model`` writes)."""
    return (json.dumps(doc, indent=1) + "\n").encode()


def read_header_unverified(path: str | os.PathLike[str]) -> BundleHeader:
    """The header as stored, without checking its MAC: for data owners (who have no model key) to
    read the preprocessing, and for the enclave to learn which model key it needs."""
    doc, _ = _read_document(path)
    try:
        _check_members(doc, Path(path) / HEADER_FILE)
        return BundleHeader.parse(doc["header"], _where(path))
    except IntegrityError as e:  # without the model key, a change cannot be told from another format
        raise IntegrityError(f"{e}; the header could not be authenticated here (no model key): tampered?") from None


def _where(path: str | os.PathLike[str]) -> str:
    return f"{Path(path).name}/{HEADER_FILE}"


def _read_document(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    """header.json as {"header": {...}, "mac": str} and its bytes: nothing inside the header checked yet."""
    file = Path(path) / HEADER_FILE
    if not os.path.lexists(file):
        raise BranchyError(f"{path}: not a sealed bundle (no {HEADER_FILE})")
    try:  # a regular file of bounded size, checked before reading (never a link to /dev/zero)
        raw = read_regular_file(file, "bundle header", MAX_HEADER_BYTES)
    except BranchyError as e:
        raise IntegrityError(str(e)) from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also nesting too deep, integers too long
        raise IntegrityError(f"{file}: header is not valid JSON ({e.__class__.__name__})") from None
    if (
        not isinstance(doc, dict)
        or tuple(doc) != DOC_MEMBERS
        or not isinstance(doc["header"], dict)
        or not isinstance(doc["mac"], str)
    ):
        raise IntegrityError(f"{file}: malformed bundle header (not exactly the members 'header' and 'mac')")
    return doc, raw


def _check_members(doc: dict[str, Any], file: Path) -> None:
    header = doc["header"]
    if header.get("format") != BUNDLE_FORMAT:
        raise IntegrityError(f"{file}: unknown bundle format {shown(header.get('format'), 40)}")
    stages = header.get("stages")
    if (
        tuple(header) != HEADER_MEMBERS
        or not isinstance(stages, list)
        or not all(isinstance(st, dict) and tuple(st) == STAGE_MEMBERS for st in stages)
    ):
        raise IntegrityError(f"{file}: the header does not have exactly the members a sealed bundle has")


@dataclass
class SealedBundle:
    path: Path
    header: BundleHeader
    model_key: bytes

    @property
    def num_stages(self) -> int:
        return self.header.num_stages

    def stage_name(self, k: int) -> str:
        """Stage k's file as messages name it (BUNDLE/stage-KK.bin)."""
        return f"{self.path.name}/{self.header.stages[k].file}"

    def decrypt_stage(self, k: int, into: aead.PlainBuffer | None = None) -> aead.PlainBuffer:
        """Stage k's plaintext (its payload, in ``into`` or a fresh buffer), every chunk verified."""
        h, entry = self.header, self.header.stages[k]
        what = self.stage_name(k)
        key = stage_key(self.model_key, h.bundle_id, h.model_version, k)
        try:
            with open(self.path / entry.file, "rb", buffering=0) as f:
                return aead.open_chunks(
                    key,
                    f,
                    stage_context(h.bundle_id, h.model_version, k),
                    entry.plaintext_size,
                    h.chunk_size,
                    what,
                    into,
                )
        except FileNotFoundError:
            raise IntegrityError(f"{what}: stage file missing") from None
        except OSError as e:
            raise BranchyError(f"{what}: cannot read ({e.strerror})") from None


def open_bundle(path: str | os.PathLike[str], model_key: bytes, min_version: int = 0) -> SealedBundle:
    """Verify the header with the model key; refuse versions below ``min_version``.

    The MAC is checked over the header object exactly as read, and the file's bytes must be those
    that object is written as; only then is the header parsed into its type."""
    path = Path(path)
    doc, raw = _read_document(path)  # the MAC first: a change anywhere in the header is tampering
    sealed = doc["header"]  # untyped until authenticated
    where = _where(path)
    try:
        expected = header_mac(model_key, sealed)
    except (ValueError, RecursionError) as e:  # e.g. NaN smuggled into the JSON
        raise IntegrityError(f"{where}: header cannot be authenticated ({e}): tampered") from None
    # compare_digest refuses non-ASCII str (TypeError): only a hex MAC can be the right one anyway.
    if not doc["mac"].isascii() or not hmac.compare_digest(expected, doc["mac"]):
        if isinstance(sealed.get("key_id"), str) and sealed["key_id"] != key_id(model_key):
            raise IntegrityError(
                f"{where}: sealed for model key id {shown(sealed.get('key_id'), 40)}, but the key given "
                f"has id {key_id(model_key)}"
            )
        raise IntegrityError(f"{where}: header failed authentication (tampered, or the wrong model key)")
    # The MAC covers the parsed header; also refuse any change to the file's bytes that parses to
    # the same header (whitespace, escapes, digits): the file must be byte for byte as sealed.
    if raw != header_file_bytes(doc):
        raise IntegrityError(f"{where}: header bytes differ from the sealed file (reformatted or tampered)")
    _check_members(doc, path / HEADER_FILE)
    try:
        header = BundleHeader.parse(sealed, where)
    except IntegrityError as e:
        detail = str(e).removeprefix(f"{where}: ")
        raise IntegrityError(f"{where}: authentic header with unusable fields: {detail}") from None
    if header.model_version < min_version:
        raise IntegrityError(
            f"{where}: model version {header.model_version} is older than the minimum {min_version} (rollback refused)"
        )
    return SealedBundle(path, header, model_key)
