"""The online service's description of its model (``GET /v1/model``): served by ``tee.serve.server``,
read by the data owner's ``client.online``, which preprocesses its images with it. Standard library only
(enclave side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import Fields
from branchy_tee.tee.criteria import NAMES, Criterion, criterion
from branchy_tee.tee.sealed.header import BundleHeader, ModelRef
from branchy_tee.tee.sealed.preprocessing import Preprocessing


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    criterion: Criterion
    num_exits: int
    model: ModelRef  # the sealed bundle that answers

    @classmethod
    def of(cls, header: BundleHeader) -> "ModelInfo":
        h = header
        return cls(h.arch, h.classes, h.preprocessing, h.criterion, h.num_stages, h.model_ref)

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_json(),
            "criterion": self.criterion.name,
            "num_exits": self.num_exits,
            **self.model.to_json(),
        }

    @classmethod
    def parse(cls, doc: object, where: str) -> "ModelInfo":
        f = Fields(doc, where, "the model description", BranchyError)
        info = cls(
            f.text("arch"),
            f.texts("classes"),
            f.nested("preprocessing", Preprocessing.parse),
            criterion(f.check("criterion", lambda v: v in NAMES, "one of " + ", ".join(NAMES))),
            f.integer("num_exits", 2),
            ModelRef(f.text("bundle_id"), f.integer("model_version", 1), f.text("model_key_id")),
        )
        f.done()
        return info
