"""What the model card and the sealed bundle's header both say about a model: architecture,
builder arguments, class names, preprocessing, exit rule and costs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import Fields
from branchy_tee.tee.criteria import NAMES, Criterion, criterion
from branchy_tee.tee.sealed.preprocessing import Preprocessing


def read_criterion(f: Fields) -> Criterion:
    """The member ``criterion``: one of the exit criteria's names."""
    return criterion(f.check("criterion", lambda v: v in NAMES, f"one of {', '.join(NAMES)}"))


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
            criterion=read_criterion(f),
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
