"""Setting up a training run: device and process group, data, the model (or the trained model
exits are attached to), optimizer, loaders, the model card, and the state of a resumed run."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.data import load_dataset, train_val_split
from branchy_tee.data.transforms import eval_transform, train_transform
from branchy_tee.models import create_model, resolve_name
from branchy_tee.models.card import DataSpec, ModelCard
from branchy_tee.models.cost import arch_part_flops
from branchy_tee.models.layout import channels_last
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.rundir import read_model_card
from branchy_tee.tee.criteria import criterion
from branchy_tee.train import attach
from branchy_tee.train.checkpoint import load_checkpoint, load_teacher
from branchy_tee.train.choices import OPTIMIZERS
from branchy_tee.train.config import TrainConfig, check_config, jsonable


def pick_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    want_cuda = cfg.require_cuda or cfg.device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise BranchyError("CUDA was required (--cuda / --device cuda) but no CUDA device is available")
    if cfg.require_cuda and cfg.device == "cpu":
        raise UsageError("--cuda requires CUDA but --device cpu was given")
    if want_cuda or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def seed_epoch(seed: int, epoch: int) -> int:
    s = (seed * 1_000_003 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def default_weight_decay(optim: str) -> float:
    return {"sgd": 5e-4, "adamw": 0.01, "adam": 0.0}[optim]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(cfg.optim)
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=wd)
    if cfg.optim == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    raise UsageError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")


def data_spec(cfg: TrainConfig) -> DataSpec:
    """Which data set and validation split a run uses (the model card's ``data``)."""
    return DataSpec(cfg.dataset or "fashion-mnist", {"seed": cfg.seed, **cfg.synthetic}, cfg.val_fraction, cfg.seed)


def load_datasets(cfg: TrainConfig, data: DataSpec):
    """(train, validation) subsets of the training split, with their transforms."""
    full = load_dataset(data.dataset, "train", cfg.data_dir, cfg.download, data.synthetic)
    train_idx, val_idx = train_val_split(len(full), data.val_fraction, seed=data.seed)
    size = full.input_shape[-1]
    if cfg.augment:
        aug = train_transform(full.preprocessing, size=size, padding=max(2, size // 8))
    else:
        aug = eval_transform(full.preprocessing)
    return full.subset(train_idx, aug), full.subset(val_idx, eval_transform(full.preprocessing)), full


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best validation loss so far and the epochs since."""

    start_epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0


@dataclass
class Run:
    """Everything one training run works with, built by ``_set_up``."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    frozen: bool  # attaching exits: backbone and final exit stay as they are
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    val_ds: object
    sampler: object
    generators: tuple[torch.Generator, torch.Generator]  # the sampler's and the loader's, reseeded per epoch
    card: ModelCard
    progress: Progress

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def show(self) -> bool:
        return self.is_main and not self.cfg.quiet

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"


RUN_FILES = ("checkpoint.pt", "model.json", "metrics.jsonl")  # what makes a directory hold a run


def check_run_dir(cfg: TrainConfig, out: Path) -> None:
    """A run directory holds one run: training into one that has a run needs --resume (continue it)
    or --force (replace it: its metrics are started afresh, not appended to)."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume or not held:
        return
    if not cfg.force:
        raise UsageError(
            f"--out {out} already holds a run ({held[0]}): give a new --out, --resume to continue it, "
            "or --force to replace it"
        )
    (out / "metrics.jsonl").unlink(missing_ok=True)


def _resumed(cfg: TrainConfig, out: Path, optimizer, scheduler, progress: "Progress") -> None:
    """Say where the run resumes; a different --epochs recomputes the cosine schedule for the new
    total, continuing from the current epoch (the learning rate set to the new curve's value there)."""
    old = scheduler.T_max
    if old != cfg.epochs:
        scheduler.T_max = cfg.epochs
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            cos = math.cos(math.pi * scheduler.last_epoch / cfg.epochs)
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + cos) / 2
    if cfg.quiet:
        return
    print(
        f"resumed {out} at epoch {progress.start_epoch + 1}/{cfg.epochs} (best epoch {progress.best_epoch + 1}, "
        f"val loss {progress.best_loss:.4f})"
        + (
            f"; the cosine schedule is recomputed for {cfg.epochs} epochs instead of {old}" if old != cfg.epochs else ""
        ),
        flush=True,
    )


def _resume_checkpoint(cfg: TrainConfig, ckpt_path: Path) -> dict | None:
    check_run_dir(cfg, ckpt_path.parent)
    if not cfg.resume:
        return None
    if not ckpt_path.is_file():
        raise BranchyError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["arch"] != cfg.net:
        raise BranchyError(f"--resume: {ckpt_path} is a {ckpt['arch']} checkpoint, not {cfg.net}")
    return ckpt


def _build_model(cfg: TrainConfig, arch: str, full, frozen: bool) -> tuple[MultiExitNet, dict | None]:
    """The model to train (its source record when attaching exits), seeded so that the initial
    weights depend on the seed only."""
    torch.manual_seed(cfg.seed)
    source = None
    if frozen:
        model, source = attach.source_model(cfg, full.input_shape, full.num_classes)
        attach.freeze_backbone(model)
    else:
        model = create_model(arch, num_classes=full.num_classes, in_channels=full.input_shape[0], **cfg.model_config)
    model.exit_grad_scale = cfg.exit_grad_scale
    if cfg.exit_weights is not None and len(cfg.exit_weights) != model.num_exits:
        raise UsageError(f"--exit-weights needs {model.num_exits} values for {arch}, got {len(cfg.exit_weights)}")
    return model, source


def _loaders(cfg: TrainConfig, train_ds, val_ds, rank: int, world: int, device: torch.device):
    """(train loader, validation loader, sampler, (sampler generator, loader generator))."""
    sampler_gen, loader_gen = torch.Generator(), torch.Generator()
    sampler: Sampler
    if world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_ds, generator=sampler_gen)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        generator=loader_gen,
        pin_memory=pin,
        drop_last=len(train_ds) > cfg.batch_size,
    )
    val_loader = DataLoader(
        val_ds, batch_size=max(cfg.batch_size, 256), shuffle=False, num_workers=cfg.num_workers, pin_memory=pin
    )
    return train_loader, val_loader, sampler, (sampler_gen, loader_gen)


def _model_card(cfg: TrainConfig, arch: str, model, full, data: DataSpec, world: int, source: dict | None) -> ModelCard:
    stage_flops, head_flops = arch_part_flops(arch, model.config, full.input_shape)
    training = {"config": jsonable(cfg), "world_size": world, **({"attached_to": source} if source else {})}
    return ModelCard(
        arch=arch,
        config=model.config,
        classes=tuple(full.classes),
        dataset=full.name,
        preprocessing=full.preprocessing,
        criterion=criterion(cfg.criterion),
        thresholds=None,  # until calibration: never exit early
        stage_flops=tuple(stage_flops),
        head_flops=tuple(head_flops),
        data=data,
        training=training,
    )


def set_up(cfg: TrainConfig) -> Run:
    """Check the options, load the data, build (or attach to) the model, the optimizer and the
    loaders, and restore the state of a resumed run."""
    check_config(cfg)
    frozen = attach.is_attaching(cfg)
    source_card = read_model_card(cfg.attach_exits) if cfg.attach_exits else None
    arch = source_card.arch if source_card and not cfg.net else resolve_name(cfg.net or "mobilenetv1")
    cfg.net = arch
    out = Path(cfg.out)
    device = pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(device.type)
    resume_ckpt = _resume_checkpoint(cfg, out / "checkpoint.pt")
    data = attach.source_data(cfg, source_card) if source_card else data_spec(cfg)
    train_ds, val_ds, full = load_datasets(cfg, data)
    model, source = _build_model(cfg, arch, full, frozen)
    if resume_ckpt is not None and resume_ckpt["model_config"] != model.config:
        raise BranchyError(
            f"--resume: {out / 'checkpoint.pt'} was trained with {resume_ckpt['model_config']}, not {model.config}"
        )
    card = _model_card(cfg, arch, model, full, data, world, source)
    channels_last(model).to(device)  # faster convolutions on CPU (models.layout)
    teacher = load_teacher(cfg.teacher, full.num_classes, device) if cfg.distill == "teacher" and cfg.teacher else None
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    progress = Progress()
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        progress = Progress(
            resume_ckpt["epoch"] + 1, resume_ckpt["best_loss"], resume_ckpt["best_epoch"], resume_ckpt["bad_epochs"]
        )
        _resumed(cfg, out, optimizer, scheduler, progress)
    train_model: torch.nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    train_loader, val_loader, sampler, generators = _loaders(cfg, train_ds, val_ds, rank, world, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return Run(
        cfg,
        out,
        device,
        rank,
        world,
        frozen,
        model,
        train_model,
        teacher,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        val_ds,
        sampler,
        generators,
        card,
        progress,
    )
