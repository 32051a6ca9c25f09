"""The model card: a run directory's ``model.json``, what training, calibration, evaluation and
sealing know about a trained model.

Written by training (``train.trainer``), updated by calibration, read by evaluation, export,
sealing and the benchmarks; ``models.rundir`` reads and writes the file. Layout (indent 2, in this order)::

    {"format": "branchy-tee/model/v1", "arch", "config", "classes", "dataset", "preprocessing",
     "criterion", "thresholds", "stage_flops", "head_flops",
     "data", "training", "calibration"}          (the last three only when known)

``config`` holds the model builder's arguments (``create_model(arch, **config)``), ``training`` a
free-form record of how the run was trained (read by people, never decided on). Standard library
only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import Fields
from branchy_tee.tee.criteria import Criterion
from branchy_tee.tee.sealed.facts import ModelFacts, read_criterion

MODEL_FORMAT = "branchy-tee/model/v1"


@dataclass(frozen=True)
class DataSpec:
    """Which data set a run was trained on and how its validation split was carved (so that
    calibration and evaluation load exactly that split)."""

    dataset: str
    synthetic: dict[str, Any]  # make_synthetic's arguments (used when dataset is "synthetic")
    val_fraction: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "synthetic": self.synthetic,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    @classmethod
    def parse(cls, f: Fields) -> "DataSpec":
        spec = cls(
            f.text("dataset"),
            f.obj("synthetic"),
            f.check("val_fraction", lambda v: isinstance(v, float) and 0 < v < 1, "a number in (0, 1)"),
            f.integer("seed"),
        )
        f.done()
        return spec


@dataclass(frozen=True)
class Calibration:
    """What calibration chose and measured on the validation split (``evaluate.calibrate``)."""

    criterion: Criterion
    thresholds: tuple[float, ...]
    accuracy: float
    mean_flops: float
    exit_fractions: tuple[float, ...]
    final_accuracy: float
    full_flops: int
    max_accuracy_drop: float
    margin_se: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **doc,
            "criterion": self.criterion.name,
            "thresholds": list(self.thresholds),
            "exit_fractions": list(self.exit_fractions),
        }

    @classmethod
    def parse(cls, f: Fields) -> "Calibration":
        c = cls(
            read_criterion(f),
            f.numbers("thresholds"),
            f.number("accuracy"),
            f.number("mean_flops"),
            f.numbers("exit_fractions"),
            f.number("final_accuracy"),
            f.integer("full_flops", 0),
            f.number("max_accuracy_drop"),
            f.number("margin_se"),
            f.integer("samples", 0),
        )
        f.done()
        return c


@dataclass(frozen=True)
class ModelCard(ModelFacts):
    dataset: str  # the data set's name (``data`` says how it was loaded)
    data: DataSpec | None = None
    training: dict[str, Any] | None = None
    calibration: Calibration | None = None

    def replace(self, **changes: Any) -> "ModelCard":
        card = dataclasses.replace(self, **changes)
        card.check_facts("the changed model card")
        return card

    def to_json(self) -> dict[str, Any]:
        facts = self.facts_json()
        doc: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "arch": self.arch,
            "config": self.config,
            "classes": facts["classes"],
            "dataset": self.dataset,
            **facts,
        }
        for name in ("data", "training", "calibration"):
            v = getattr(self, name)
            if v is not None:
                doc[name] = v if isinstance(v, dict) else v.to_json()
        return doc

    @classmethod
    def parse(cls, doc: object, where: str) -> "ModelCard":
        f = Fields(doc, where, "the model card")
        if f.doc.get("format") != MODEL_FORMAT:
            raise BranchyError(f"{where}: not a branchy-tee model description (format is not {MODEL_FORMAT})")
        f.text("format")
        card = cls(
            **cls.parse_facts(f),
            dataset=f.text("dataset"),
            data=f.optional("data", lambda n: f.nested(n, DataSpec.parse)),
            training=f.optional("training", f.obj),
            calibration=f.optional("calibration", lambda n: f.nested(n, Calibration.parse)),
        )
        f.done()
        card.check_facts(where)
        return card
