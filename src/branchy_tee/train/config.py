"""The options of one training run (``branchy-tee train``), their checks, and their JSON record."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from branchy_tee.core.errors import UsageError
from branchy_tee.train import attach
from branchy_tee.train.choices import DISTILL, OPTIMIZERS


@dataclass
class TrainConfig:
    net: str | None = None  # None: mobilenetv1, or the architecture of --attach-exits
    dataset: str | None = None  # None: fashion-mnist, or the data set of --attach-exits
    data_dir: str | None = None
    download: bool = False
    out: str = "runs/latest"
    lr: float = 1e-4
    batch_size: int = 100
    num_workers: int = 2
    epochs: int = 100
    patience: int = 7
    optim: str = "adamw"
    weight_decay: float | None = None  # None: 5e-4 for SGD, 0.01 for AdamW, 0 for Adam
    device: str = "auto"
    require_cuda: bool = False  # the seed's --cuda
    distill: str = "none"  # measured: docs/training.md
    teacher: str | None = None
    temperature: float = 4.0
    alpha: float = 0.2  # when distilling; the least harmful of those measured (docs/training.md)
    exit_weights: list[float] | None = None
    distill_warmup: float = 0.0  # epochs over which alpha ramps up linearly from 0
    exit_grad_scale: float = 1.0  # factor on the gradient the early exits send into the backbone
    attach_exits: str | None = None  # a run directory: freeze its backbone and final exit, train the early exits
    backbone_weights: str | None = None  # a plain single-exit state dict: the same, for --net
    seed: int = 0
    max_batches: int | None = None
    resume: bool = False
    force: bool = False  # replace a run already in ``out`` (else refused: it is never overwritten silently)
    val_fraction: float = 0.1
    augment: bool = True  # random crop (padded) and horizontal flip of training images
    model_config: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"width": 16}
    synthetic: dict = field(default_factory=dict)  # make_synthetic arguments for --dataset synthetic
    criterion: str = "entropy"
    max_accuracy_drop: float = 0.01
    quiet: bool = False


def check_config(cfg: TrainConfig) -> None:
    if cfg.optim not in OPTIMIZERS:
        raise UsageError(f"--optim must be one of {', '.join(OPTIMIZERS)}")
    if cfg.distill not in DISTILL:
        raise UsageError(f"--distill must be one of {', '.join(DISTILL)}")
    if cfg.distill == "teacher" and not cfg.teacher:
        raise UsageError("--distill teacher needs --teacher CKPT (a run directory or checkpoint.pt)")
    if cfg.teacher and cfg.distill != "teacher":
        raise UsageError("--teacher is only used with --distill teacher")
    for name, value in [("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--patience", cfg.patience)]:
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise UsageError("--lr must be a positive number")
    if cfg.temperature <= 0:
        raise UsageError("--temperature must be positive")
    if not 0 <= cfg.alpha <= 1:
        raise UsageError("--alpha is the share of distillation in each early exit's loss, in [0, 1]")
    if cfg.distill_warmup < 0 or cfg.exit_grad_scale < 0:
        raise UsageError("--distill-warmup and --exit-grad-scale must not be negative")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError("--val-fraction must be in (0, 1)")
    attach.check_options(cfg)


def jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))
