"""The sealed model bundle: a directory with an authenticated plaintext header and one encrypted
file per stage.

    model.btee/
      header.json       {"header": {...}, "mac": "<HMAC-SHA256 over the canonical header JSON>"}
      stage-00.bin      chunked AES-256-GCM of safetensors bytes: stage 0's weights + exit head 0
      stage-01.bin      ...

Keys (all derived from the model key with HKDF): the header MAC key is bound to the bundle id; each
stage's key is bound to (bundle id, model version, stage index), and every chunk's nonce and
associated data also carry them. A fresh random bundle id per seal means that stage files swapped
between bundles, or between versions of one model, fail authentication; a replayed older bundle is
authentic but is refused below the minimum model version.

The header is plaintext on purpose: data owners read the preprocessing from it without the model
key. It reveals the architecture, class names and thresholds, not the weights.
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

import torch
from safetensors.torch import save as st_save

from ..errors import BranchyError, IntegrityError, shown
from ..fileio import read_regular_file
from . import aead
from .keys import derive, key_id

BUNDLE_FORMAT = "branchy-tee/bundle/v1"
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


def stage_state(model, k: int) -> dict[str, torch.Tensor]:
    """Stage k's weights and buffers with exit head k's, keyed ``stage.*`` and ``exit.*``."""
    state = {f"stage.{n}": t for n, t in model.stages[k].state_dict().items()}
    state.update({f"exit.{n}": t for n, t in model.exits[k].state_dict().items()})
    return {n: t.detach().contiguous().cpu() for n, t in state.items()}


# Convolution weights are stored in (out, kh, kw, in) order: read back in place and permuted, they are
# channels-last tensors, the fast layout on CPU (see runtime.tuning), without a copy at load time.
CONV_LAYOUT_KEY, CONV_LAYOUT = "conv_layout", "ohwi"


def _to_ohwi(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.permute(0, 2, 3, 1).contiguous() if t.dim() == 4 else t for n, t in state.items()}


# --------------------------------------------------------------------------- writing (model owner)
@torch.no_grad()
def _activation_elems(model, input_shape) -> list[int]:
    """Per stage, the elements of one sample's stage input plus output: what the runtime must hold
    while running it. Recorded in the header so the enclave can budget memory without a dry run."""
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *input_shape)
    out = []
    for stage in model.stages:
        nxt = stage(h)
        out.append(h.numel() + nxt.numel())
        h = nxt
    model.train(was_training)
    return out


def seal_model(model, meta: dict, model_key: bytes, out: str | os.PathLike, version: int = 1,
               chunk_size: int = aead.DEFAULT_CHUNK) -> dict:
    """Seal a trained model (``model`` in eval mode, ``meta`` from its model.json) into ``out``.

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
    activations = _activation_elems(model, meta["preprocessing"]["input_shape"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        stages = []
        for k in range(model.num_exits):
            state = stage_state(model, k)
            plain = st_save(_to_ohwi(state), metadata={"stage": str(k), CONV_LAYOUT_KEY: CONV_LAYOUT})
            name = f"stage-{k:02d}.bin"
            key = _stage_key(model_key, bundle_id, version, k)
            with open(tmp / name, "wb") as f:
                for chunk in aead.seal_chunks(key, plain, _stage_context(bundle_id, version, k), chunk_size):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
            stages.append({"index": k, "file": name, "plaintext_size": len(plain), "weight_bytes": weight_bytes,
                           "activation_elems": activations[k],
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
        """Stage k's plaintext (safetensors bytes, in ``into`` or a fresh buffer), every chunk verified."""
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

    def read_stage(self, k: int) -> dict[str, torch.Tensor]:
        """Decrypt, verify and deserialise stage k (its weights and its exit head)."""
        plain = self.decrypt_stage(k)
        try:
            return tensors_from_safetensors(plain)
        except ValueError as e:  # authentic bytes that are not safetensors: a bug at sealing time
            raise IntegrityError(f"{self.path.name}/{self.header['stages'][k]['file']}: authentic but not a safetensors payload ({e})") from None


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def tensors_from_safetensors(buf) -> dict[str, torch.Tensor]:
    """Tensors that view ``buf`` in place (safetensors layout: u64 header size, JSON header, data).

    ``safetensors.torch.load`` needs ``bytes`` and copies every tensor out of them: two more copies
    of the largest stage at the moment memory is tightest. Here the decrypted buffer itself backs
    the tensors. The payload was authenticated before this runs; the checks guard against bugs.
    Anything that is not a well-formed payload raises ValueError (and nothing else).
    """
    if len(buf) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise ValueError("header size exceeds the payload")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except RecursionError:
        raise ValueError("safetensors header nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    ohwi = isinstance(meta, dict) and meta.get(CONV_LAYOUT_KEY) == CONV_LAYOUT
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name}: entry is not a JSON object")
        dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise ValueError(f"tensor {name}: unsupported dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name}: shape is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise ValueError(f"tensor {name}: data_offsets is not a pair of integers")
        start, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= len(buf) - base or end - start != numel * itemsize:
            raise ValueError(f"tensor {name}: data offsets do not match its shape")
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start).view(shape)
        out[name] = t.permute(0, 3, 1, 2) if ohwi and t.dim() == 4 else t
    return out


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
