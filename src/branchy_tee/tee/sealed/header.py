"""The sealed bundle's header (``header.json``'s ``header``) and its stage entries, typed.

``tee.sealed.bundle`` authenticates the header as it was read (its MAC is over the canonical JSON of that
very object, never over a re-serialisation) and only then parses it here; data owners and the
enclave build parse it unauthenticated for what they need before the model key exists. The header
must have exactly these members, in this order, and so must every stage entry. Standard library
only (enclave side).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from branchy_tee.core.errors import BranchyError, IntegrityError
from branchy_tee.core.keys import KEY_ID_RE
from branchy_tee.core.strict import Fields
from branchy_tee.tee.sealed.facts import ModelFacts

BUNDLE_FORMAT = "branchy-tee/bundle/v2"  # v2: stage payloads are ONNX graphs (v1: safetensors)
HEADER_MEMBERS = (
    "format",
    "bundle_id",
    "model_version",
    "key_id",
    "arch",
    "config",
    "classes",
    "preprocessing",
    "criterion",
    "thresholds",
    "stage_flops",
    "head_flops",
    "chunk_size",
    "stages",
)
BUNDLE_ID_RE = re.compile(r"[0-9a-f]{32}")  # a fresh random id per seal
STAGE_MEMBERS = ("index", "file", "plaintext_size", "weight_bytes", "activation_elems", "sealed_size")


def stage_file(k: int) -> str:
    return f"stage-{k:02d}.bin"


@dataclass(frozen=True)
class StageEntry:
    index: int
    file: str  # stage-KK.bin in the bundle directory
    plaintext_size: int  # bytes of the stage's payload (export.payload: graph, then weight blob)
    weight_bytes: int  # what its session keeps resident: the unit of the enclave's memory budget
    activation_elems: int  # one sample's graph input plus the outputs it computes (tee.budget)
    sealed_size: int  # bytes of the encrypted file

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": self.file,
            "plaintext_size": self.plaintext_size,
            "weight_bytes": self.weight_bytes,
            "activation_elems": self.activation_elems,
            "sealed_size": self.sealed_size,
        }

    @classmethod
    def parse(cls, f: Fields, k: int) -> "StageEntry":
        entry = cls(
            f.check("index", lambda v: type(v) is int and v == k, f"{k}"),
            f.text("file", lambda v: v == stage_file(k), repr(stage_file(k))),
            f.integer("plaintext_size", 0),
            f.integer("weight_bytes", 0),
            f.integer("activation_elems", 0),
            f.integer("sealed_size", 0),
        )
        f.done(STAGE_MEMBERS)
        return entry


@dataclass(frozen=True)
class ModelRef:
    """Which sealed model answered: what a result names (``tee.sealed.envelope``)."""

    bundle_id: str
    model_version: int
    model_key_id: str

    def to_json(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "model_version": self.model_version, "model_key_id": self.model_key_id}


@dataclass(frozen=True)
class BundleHeader(ModelFacts):
    bundle_id: str
    model_version: int
    key_id: str  # the model key's id
    chunk_size: int
    stages: tuple[StageEntry, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.bundle_id, self.model_version, self.key_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "bundle_id": self.bundle_id,
            "model_version": self.model_version,
            "key_id": self.key_id,
            **self.facts_json(),
            "chunk_size": self.chunk_size,
            "stages": [s.to_json() for s in self.stages],
        }

    @classmethod
    def parse(cls, doc: object, where: str) -> "BundleHeader":
        """IntegrityError (one line, naming ``where`` and the member) unless ``doc`` is a header."""
        f = Fields(doc, where, "the bundle header", IntegrityError)
        f.text("format", lambda v: v == BUNDLE_FORMAT, BUNDLE_FORMAT)
        header = cls(
            bundle_id=f.text("bundle_id", lambda v: BUNDLE_ID_RE.fullmatch(v) is not None, "32 hex digits"),
            model_version=f.integer("model_version", 1),
            key_id=f.text("key_id", lambda v: KEY_ID_RE.fullmatch(v) is not None, "a key id (16 hex digits)"),
            **cls.parse_facts(f),
            chunk_size=f.integer("chunk_size", 1),
            stages=f.each("stages", StageEntry.parse),
        )
        f.done(HEADER_MEMBERS)
        header.check(where, IntegrityError)
        return header

    def check(self, where: str, error: type[BranchyError]) -> None:
        if len(self.stages) < 2 or self.num_stages != self.num_exits:
            raise error(f"{where}: {self.num_stages} stages for {self.num_exits} exits (a bundle has at least two)")
        self.check_facts(where, error)
