"""The model card: a run directory's ``model.json``, what training, calibration, evaluation and
sealing know about a trained model.

Written by training (``train.trainer``), updated by calibration, read by evaluation, export,
sealing and the benchmarks; ``rundir`` reads and writes the file. Layout (indent 2, in this order)::

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

from .errors import BranchyError
from .preprocessing import Preprocessing
from .runtime.criteria import NAMES, Criterion, criterion
from .strict import Fields

MODEL_FORMAT = "branchy-tee/model/v1"


def _criterion(f: Fields) -> Criterion:
    return criterion(f.check("criterion", lambda v: v in NAMES, f"one of {', '.join(NAMES)}"))


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
            _criterion(f),
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
class ModelFacts:
    """What the model card and the sealed bundle's header both say about the model, in the same
    members: architecture, builder arguments, class names, preprocessing, exit rule, costs."""

    arch: str
    config: dict[str, Any]  # create_model's keyword arguments: num_classes, in_channels, ...
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    criterion: Criterion
    thresholds: tuple[float, ...] | None  # one per early exit; None until calibrated (never exit early)
    stage_flops: tuple[int, ...]
    head_flops: tuple[int, ...]

    @property
    def num_exits(self) -> int:
        return len(self.stage_flops)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    def exit_thresholds(self, full_model: bool = False) -> tuple[float, ...]:
        """The thresholds early exit runs with: the calibrated ones, or (uncalibrated, or
        ``full_model``) thresholds no sample passes."""
        if full_model or self.thresholds is None:
            return (self.criterion.never,) * (self.num_exits - 1)
        return self.thresholds

    def facts(self) -> dict[str, Any]:
        """These members as keyword arguments (for another artifact that holds them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelFacts)}

    def facts_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "config": self.config,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_json(),
            "criterion": self.criterion.name,
            "thresholds": None if self.thresholds is None else list(self.thresholds),
            "stage_flops": list(self.stage_flops),
            "head_flops": list(self.head_flops),
        }

    @staticmethod
    def parse_facts(f: Fields) -> dict[str, Any]:
        """The members as keyword arguments (for the artifact's constructor)."""
        return dict(
            arch=f.text("arch"),
            config=f.obj("config"),
            classes=f.texts("classes"),
            preprocessing=f.nested("preprocessing", Preprocessing.parse),
            criterion=_criterion(f),
            thresholds=f.or_null("thresholds", f.numbers),
            stage_flops=f.integers("stage_flops", lo=0),
            head_flops=f.integers("head_flops", lo=0),
        )

    def check_facts(self, where: str, error: type[BranchyError] = BranchyError) -> None:
        """The members agree with each other (one exit per stage, one threshold per early exit, ...)."""
        problem = None
        cfg = self.config
        if not all(
            isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) and cfg[k] >= 1
            for k in ("num_classes", "in_channels")
        ):
            problem = "config needs num_classes and in_channels (integers >= 1)"
        elif len(self.classes) != cfg["num_classes"]:
            problem = f"{len(self.classes)} class names for {cfg['num_classes']} classes"
        elif self.preprocessing.channels != cfg["in_channels"]:
            problem = f"preprocessing has {self.preprocessing.channels} channels, the model {cfg['in_channels']}"
        elif len(self.stage_flops) < 2 or len(self.head_flops) != len(self.stage_flops):
            problem = "stage_flops and head_flops need one entry per exit (at least two)"
        elif self.thresholds is not None and len(self.thresholds) != self.num_exits - 1:
            problem = f"{len(self.thresholds)} thresholds for {self.num_exits - 1} early exits"
        if problem:
            raise error(f"{where}: {problem}")


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
