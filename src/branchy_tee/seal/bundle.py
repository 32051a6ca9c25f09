"""The sealed model bundle: a directory with an authenticated plaintext header and one encrypted
file per stage.

    model.btee/
      header.json       {"header": {...}, "mac": "<HMAC-SHA256 over the canonical header JSON>"}
      stage-00.bin      chunked AES-256-GCM of stage 0's ONNX graph (the stage and exit head 0)
      stage-01.bin      ...

Keys (all derived from the model key with HKDF): the header MAC key is bound to the bundle id; each
stage's key is bound to (bundle id, model version, stage index), and every chunk's nonce and
associated data also carry them. A fresh random bundle id per seal means that stage files swapped
between bundles, or between versions of one model, fail authentication; a replayed older bundle is
authentic but is refused below the minimum model version.

The header is plaintext on purpose: data owners read the preprocessing from it without the model
key. It reveals the architecture, class names and thresholds, not the weights.

What is sealed is what the owner evaluated and calibrated: the stage graphs exported into the run
directory (``export.onnx``), byte for byte. The enclave builds each stage's ONNX Runtime session
from the decrypted bytes in memory (``runtime.graphs``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BranchyError, IntegrityError, shown
from ..fileio import read_regular_file
from . import aead
from .keys import derive, key_id

BUNDLE_FORMAT = "branchy-tee/bundle/v2"  # v2: stage payloads are ONNX graphs (v1: safetensors)
HEADER_FILE = "header.json"
MAX_HEADER_BYTES = 1 << 20
# header.json holds exactly these members, in this order (as seal_model writes them): anything else
# is refused before the MAC is even computed.
DOC_MEMBERS = ("header", "mac")
HEADER_MEMBERS = ("format", "bundle_id", "model_version", "key_id", "arch", "config", "classes", "preprocessing",
                  "criterion", "thresholds", "stage_flops", "head_flops", "chunk_size", "stages")  # fmt: skip
STAGE_MEMBERS = ("index", "file", "plaintext_size", "weight_bytes", "activation_elems", "sealed_size")


def canonical_json(obj) -> bytes:
    """The one byte string a JSON object is authenticated as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _stage_context(bundle_id: str, version: int, index: int) -> bytes:
    return f"stage|{bundle_id}|{version}|{index}|".encode()


def _stage_key(model_key: bytes, bundle_id: str, version: int, index: int) -> bytes:
    return derive(model_key, "bundle-stage", _stage_context(bundle_id, version, index))


def _header_mac(model_key: bytes, header: dict) -> str:
    mac_key = derive(model_key, "bundle-header", str(header.get("bundle_id", "")).encode())
    return hmac.new(mac_key, canonical_json(header), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- writing (model owner)
def seal_model(model, meta: dict, model_key: bytes, out: str | os.PathLike, version: int = 1,
               chunk_size: int = aead.DEFAULT_CHUNK) -> dict:
    """Export a model (eval mode; ``meta`` from its model.json) to stage graphs and seal them into ``out``."""
    from ..export.onnx import export_stages

    graphs, facts = export_stages(model, meta["preprocessing"]["input_shape"])
    return seal_graphs(graphs, facts, meta, model_key, out, version, chunk_size)


def seal_run(run_dir: str | os.PathLike, model_key: bytes, out: str | os.PathLike, version: int = 1,
             chunk_size: int = aead.DEFAULT_CHUNK, show: bool = False) -> dict:
    """Seal a run directory's exported stage graphs (exported first if they are missing or stale)."""
    from ..export.onnx import exported_graphs
    from ..rundir import read_model_json

    meta = read_model_json(run_dir)
    graphs, doc = exported_graphs(run_dir, show=show)
    return seal_graphs(graphs, doc["stages"], meta, model_key, out, version, chunk_size)


def seal_graphs(graphs: list[bytes], facts: list[dict], meta: dict, model_key: bytes, out: str | os.PathLike,
                version: int = 1, chunk_size: int = aead.DEFAULT_CHUNK) -> dict:
    """Seal stage graphs (ONNX bytes, one per stage; ``facts`` per stage: weight_bytes and
    activation_elems) into the bundle directory ``out``.

    The bundle is built in a temporary directory beside ``out`` and renamed into place, so ``out``
    either does not exist or is complete.
    """
    out = Path(out)
    if out.exists():
        raise BranchyError(f"{out} already exists; choose another --out or remove it")
    if version < 1:
        raise BranchyError("--version must be at least 1")
    if chunk_size < 4096:
        raise BranchyError("--chunk-size must be at least 4096 bytes")
    bundle_id = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        stages = []
        for k, (plain, fact) in enumerate(zip(graphs, facts)):
            name = f"stage-{k:02d}.bin"
            key = _stage_key(model_key, bundle_id, version, k)
            with open(tmp / name, "wb") as f:
                for chunk in aead.seal_chunks(key, plain, _stage_context(bundle_id, version, k), chunk_size):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            # plaintext_size: the graph's bytes (decrypted while its session is built); weight_bytes: what
            # its session keeps resident, the unit of the enclave's memory budget.
            stages.append({"index": k, "file": name, "plaintext_size": len(plain), "weight_bytes": int(fact["weight_bytes"]),
                           "activation_elems": int(fact["activation_elems"]),
                           "sealed_size": aead.sealed_size(len(plain), chunk_size)})
        header = {
            "format": BUNDLE_FORMAT,
            "bundle_id": bundle_id,
            "model_version": version,
            "key_id": key_id(model_key),
            "arch": meta["arch"],
            "config": meta["config"],
            "classes": meta["classes"],
            "preprocessing": meta["preprocessing"],
            "criterion": meta["criterion"],
            "thresholds": meta["thresholds"],
            "stage_flops": meta["stage_flops"],
            "head_flops": meta["head_flops"],
            "chunk_size": chunk_size,
            "stages": stages,
        }
        doc = {"header": header, "mac": _header_mac(model_key, header)}
        (tmp / HEADER_FILE).write_bytes(header_file_bytes(doc))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the bundle is ciphertext and may be shared
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def header_file_bytes(doc: dict) -> bytes:
    """The exact bytes of header.json for a header document (what ``seal_model`` writes)."""
    return (json.dumps(doc, indent=1) + "\n").encode()


# --------------------------------------------------------------------------- reading (enclave)
def read_header_unverified(path: str | os.PathLike) -> dict:
    """The header as stored, without checking its MAC: for data owners (who have no model key) to
    read the preprocessing, and for the enclave to learn which model key it needs."""
    return _read_header(path)[0]


def _read_header(path: str | os.PathLike) -> tuple[dict, bytes]:
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
    if not isinstance(doc, dict) or tuple(doc) != DOC_MEMBERS or not isinstance(doc["header"], dict) \
            or not isinstance(doc["mac"], str):
        raise IntegrityError(f"{file}: malformed bundle header (not exactly the members 'header' and 'mac')")
    header = doc["header"]
    if header.get("format") != BUNDLE_FORMAT:
        raise IntegrityError(f"{file}: unknown bundle format {shown(header.get('format'), 40)}")
    stages = header.get("stages")
    if tuple(header) != HEADER_MEMBERS or not isinstance(stages, list) or not all(
            isinstance(st, dict) and tuple(st) == STAGE_MEMBERS for st in stages):
        raise IntegrityError(f"{file}: the header does not have exactly the members a sealed bundle has")
    return doc, raw


@dataclass
class SealedBundle:
    path: Path
    header: dict
    model_key: bytes

    @property
    def num_stages(self) -> int:
        return len(self.header["stages"])

    def decrypt_stage(self, k: int, into=None):
        """Stage k's plaintext (its ONNX graph's bytes, in ``into`` or a fresh buffer), every chunk verified."""
        h = self.header
        entry = h["stages"][k]
        what = f"{self.path.name}/{entry['file']}"
        key = _stage_key(self.model_key, h["bundle_id"], h["model_version"], k)
        try:
            with open(self.path / entry["file"], "rb", buffering=0) as f:
                return aead.open_chunks(key, f, _stage_context(h["bundle_id"], h["model_version"], k),
                                        entry["plaintext_size"], h["chunk_size"], what, into)
        except FileNotFoundError:
            raise IntegrityError(f"{what}: stage file missing") from None
        except OSError as e:
            raise BranchyError(f"{what}: cannot read ({e.strerror})") from None


def _check_header_fields(header: dict, where: str) -> None:
    try:
        stages = header["stages"]
        ok = (
            isinstance(header["bundle_id"], str) and isinstance(header["model_version"], int)
            and isinstance(header["chunk_size"], int) and header["chunk_size"] > 0
            and isinstance(stages, list) and len(stages) >= 2
            and all(isinstance(s, dict) and s.get("index") == i and isinstance(s.get("plaintext_size"), int)
                    and s["plaintext_size"] >= 0 and s.get("file") == f"stage-{i:02d}.bin"
                    and isinstance(s.get("weight_bytes"), int) and isinstance(s.get("activation_elems"), int)
                    for i, s in enumerate(stages))
        )  # fmt: skip
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise IntegrityError(f"{where}: authentic header with unusable fields")


def open_bundle(path: str | os.PathLike, model_key: bytes, min_version: int = 0) -> SealedBundle:
    """Verify the header with the model key; refuse versions below ``min_version``."""
    path = Path(path)
    doc, raw = _read_header(path)
    header = doc["header"]
    where = f"{path.name}/{HEADER_FILE}"
    if header.get("key_id") != key_id(model_key):
        raise IntegrityError(f"{where}: sealed for model key id {header.get('key_id')}, but the key given has id {key_id(model_key)}")
    try:
        expected = _header_mac(model_key, header)
    except (ValueError, RecursionError) as e:  # e.g. NaN smuggled into the JSON
        raise IntegrityError(f"{where}: header cannot be authenticated ({e})") from None
    # compare_digest refuses non-ASCII str (TypeError): only a hex MAC can be the right one anyway.
    if not doc["mac"].isascii() or not hmac.compare_digest(expected, doc["mac"]):
        raise IntegrityError(f"{where}: header failed authentication (tampered or wrong model key)")
    # The MAC covers the parsed header; also refuse any change to the file's bytes that parses to
    # the same header (whitespace, escapes, digits): the file must be byte for byte as sealed.
    if raw != header_file_bytes(doc):
        raise IntegrityError(f"{where}: header bytes differ from the sealed file (reformatted or tampered)")
    _check_header_fields(header, where)
    if header["model_version"] < min_version:
        raise IntegrityError(f"{where}: model version {header['model_version']} is older than the minimum {min_version} (rollback refused)")
    return SealedBundle(path, header, model_key)
