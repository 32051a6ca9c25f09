"""Training loop for multi-exit networks, in the style of torchvision's reference scripts.

Plain functions (``train_one_epoch``, ``evaluate``, ``fit``) and plain-dict checkpoints. Each epoch's
randomness (shuffling, crops, flips, dropout) is derived from (seed, epoch), so a run resumed from its
checkpoint continues exactly as the uninterrupted run would have. Under ``torchrun`` the model is
wrapped in DistributedDataParallel with a DistributedSampler; only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..data import load_dataset, train_val_split
from ..data.transforms import eval_transform, train_transform
from ..errors import BranchyError, UsageError
from ..fileio import atomic_write_bytes
from ..models import create_model, resolve_name
from ..models.cost import arch_part_flops
from ..runtime.tuning import channels_last
from ..modelcard import DataSpec, ModelCard
from ..rundir import load_run, read_model_card, write_model_card, write_weights
from . import attach
from .losses import multi_exit_loss

from ..choices import DISTILL, OPTIMIZERS
from ..runtime.criteria import criterion


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
    val_fraction: float = 0.1
    augment: bool = True  # random crop (padded) and horizontal flip of training images
    model_config: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"width": 16}
    synthetic: dict = field(default_factory=dict)  # make_synthetic arguments for --dataset synthetic
    criterion: str = "entropy"
    max_accuracy_drop: float = 0.01
    quiet: bool = False


class NonFiniteLoss(Exception):
    pass


# --------------------------------------------------------------------------- setup helpers
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


def load_teacher(path: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A separately trained model: a run directory, or a ``checkpoint.pt`` written by this trainer."""
    p = Path(path)
    if p.is_dir():
        teacher, _ = load_run(p)
    else:
        ckpt = _load_checkpoint(p)
        teacher = create_model(ckpt["arch"], **ckpt["model_config"])
        teacher.load_state_dict(ckpt["model"])
    if teacher.config["num_classes"] != num_classes:
        raise BranchyError(f"teacher {path} has {teacher.config['num_classes']} classes, the dataset has {num_classes}")
    return teacher.to(device).eval()


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # owner side only; never in the enclave
    except FileNotFoundError:
        raise BranchyError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise BranchyError(f"{path}: unreadable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "model" not in ckpt:
        raise BranchyError(f"{path}: not a branchy-tee training checkpoint")
    return ckpt


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loops
def _accuracies(correct: list[int], seen: int) -> list[float]:
    return [c / max(seen, 1) for c in correct]


def distill_alpha(cfg: TrainConfig, progress: float) -> float:
    """The distillation weight after ``progress`` epochs: ramped up linearly over the warm-up."""
    if cfg.distill_warmup <= 0:
        return cfg.alpha
    return cfg.alpha * min(1.0, progress / cfg.distill_warmup)


def train_one_epoch(model, loader, optimizer, cfg: TrainConfig, device, epoch: int, teacher=None, show=True,
                    frozen=False) -> dict:
    from tqdm import tqdm

    attach.set_train_mode(model, frozen)
    total, seen, correct = 0.0, 0, None
    num_batches = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    bar = tqdm(loader, total=num_batches, desc=f"epoch {epoch + 1} train", leave=False, disable=None if show else True)
    for i, (x, y) in enumerate(bar):
        if i >= num_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outputs = model(x)
        if cfg.distill == "final":
            teacher_logits = outputs[-1]
        elif cfg.distill == "teacher":
            with torch.no_grad():
                teacher_logits = teacher(x)[-1]
        else:
            teacher_logits = None
        weights = cfg.exit_weights or [1.0] * len(outputs)
        alpha = distill_alpha(cfg, epoch + i / num_batches)
        loss, _ = multi_exit_loss(outputs, y, weights, alpha, cfg.temperature, teacher_logits)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(y)
        seen += n
        total += float(loss.detach()) * n
        hits = [int((o.argmax(1) == y).sum()) for o in outputs]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
        accs = _accuracies(correct, seen)
        bar.set_postfix(loss=f"{total / seen:.3f}", acc="/".join(f"{100 * a:.0f}" for a in accs))
    return {"loss": total / max(seen, 1), "exit_accuracy": _accuracies(correct or [], seen), "samples": seen}


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, device, max_batches: int | None = None, show=True) -> dict:
    """Validation loss (the same loss as training, so early stopping watches what is optimised)
    and per-exit accuracy."""
    from tqdm import tqdm

    model.eval()
    total, seen, correct = 0.0, 0, None
    weights = None
    num_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, (x, y) in enumerate(tqdm(loader, total=num_batches, desc="validate", leave=False, disable=None if show else True)):
        if i >= num_batches:
            break
        x, y = x.to(device), y.to(device)
        outputs = model(x)
        weights = weights or cfg.exit_weights or [1.0] * len(outputs)
        teacher_logits = outputs[-1] if cfg.distill != "none" else None
        loss, _ = multi_exit_loss(outputs, y, weights, cfg.alpha, cfg.temperature, teacher_logits)
        seen += len(y)
        total += float(loss) * len(y)
        hits = [int((o.argmax(1) == y).sum()) for o in outputs]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
    return {"loss": total / max(seen, 1), "exit_accuracy": _accuracies(correct or [], seen), "samples": seen}


# --------------------------------------------------------------------------- the run
def _check_config(cfg: TrainConfig) -> None:
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


def fit(cfg: TrainConfig) -> dict:
    """Train, keep the best model (lowest validation loss) in ``cfg.out``, calibrate it; return a summary."""
    _check_config(cfg)
    frozen = attach.is_attaching(cfg)
    source_card = read_model_card(cfg.attach_exits) if cfg.attach_exits else None
    cfg.net = source_card.arch if source_card and not cfg.net else resolve_name(cfg.net or "mobilenetv1")
    out = Path(cfg.out)
    device = pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(device.type)
    is_main = rank == 0
    show = is_main and not cfg.quiet
    ckpt_path = out / "checkpoint.pt"

    resume_ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise BranchyError(f"--resume: no checkpoint at {ckpt_path}")
        resume_ckpt = _load_checkpoint(ckpt_path)
        if resume_ckpt["arch"] != cfg.net:
            raise BranchyError(f"--resume: {ckpt_path} is a {resume_ckpt['arch']} checkpoint, not {cfg.net}")

    data = attach.source_data(cfg, source_card) if source_card else data_spec(cfg)
    train_ds, val_ds, full = load_datasets(cfg, data)
    in_channels, num_classes = full.input_shape[0], full.num_classes
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    source = None
    if frozen:
        model, source = attach.source_model(cfg, full.input_shape, num_classes)
        attach.freeze_backbone(model)
    else:
        model = create_model(cfg.net, num_classes=num_classes, in_channels=in_channels, **cfg.model_config)
    model.exit_grad_scale = cfg.exit_grad_scale
    if cfg.exit_weights is not None and len(cfg.exit_weights) != model.num_exits:
        raise UsageError(f"--exit-weights needs {model.num_exits} values for {cfg.net}, got {len(cfg.exit_weights)}")
    if resume_ckpt is not None and resume_ckpt["model_config"] != model.config:
        raise BranchyError(f"--resume: {ckpt_path} was trained with {resume_ckpt['model_config']}, not {model.config}")
    stage_flops, head_flops = arch_part_flops(cfg.net, model.config, full.input_shape)
    channels_last(model).to(device)  # ~20% faster convolutions on CPU (see runtime.tuning)
    teacher = load_teacher(cfg.teacher, num_classes, device) if cfg.distill == "teacher" else None

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    start_epoch, best_loss, best_epoch, bad_epochs = 0, math.inf, -1, 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        start_epoch = resume_ckpt["epoch"] + 1
        best_loss, best_epoch, bad_epochs = resume_ckpt["best_loss"], resume_ckpt["best_epoch"], resume_ckpt["bad_epochs"]

    train_model = model
    sampler_gen = torch.Generator()
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_ds, generator=sampler_gen)
    loader_gen = torch.Generator()
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              generator=loader_gen, pin_memory=pin, drop_last=len(train_ds) > cfg.batch_size)
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 256), shuffle=False, num_workers=cfg.num_workers, pin_memory=pin)

    card = ModelCard(
        arch=cfg.net,
        config=model.config,
        classes=tuple(full.classes),
        dataset=full.name,
        preprocessing=full.preprocessing,
        criterion=criterion(cfg.criterion),
        thresholds=None,  # until calibration: never exit early
        stage_flops=tuple(stage_flops),
        head_flops=tuple(head_flops),
        data=data,
        training={"config": _jsonable(cfg), "world_size": world, **({"attached_to": source} if source else {})},
    )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    stopped_early, history = False, []
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        s = seed_epoch(cfg.seed, epoch)
        sampler_gen.manual_seed(s)
        loader_gen.manual_seed(s + 1)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        try:
            tr = train_one_epoch(train_model, train_loader, optimizer, cfg, device, epoch, teacher, show, frozen)
        except NonFiniteLoss as e:
            kept = f"the last good checkpoint ({ckpt_path}, epoch {epoch}) is kept" if epoch > 0 else "no checkpoint was written"
            raise BranchyError(f"{e}; training stopped, {kept}; try a lower --lr") from None
        if world > 1:
            # BatchNorm running statistics are updated from each rank's own batches; DDP only
            # re-broadcasts them at the next forward. Take rank 0's now so that validation and the
            # saved model are the same on every rank.
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        va = evaluate(model, val_loader, cfg, device, cfg.max_batches, show)
        scheduler.step()
        improved = va["loss"] < best_loss
        if improved:
            best_loss, best_epoch, bad_epochs = va["loss"], epoch, 0
        else:
            bad_epochs += 1
        record = {
            "epoch": epoch + 1, "train_loss": tr["loss"], "train_exit_accuracy": tr["exit_accuracy"],
            "val_loss": va["loss"], "val_exit_accuracy": va["exit_accuracy"], "lr": scheduler.get_last_lr()[0],
            "best": improved, "seconds": round(time.time() - t0, 2),
        }  # fmt: skip
        history.append(record)
        if is_main:
            if improved:
                write_weights(out / "model.safetensors", model)
                training = {**(card.training or {}), "best_epoch": epoch + 1, "val_loss": best_loss,
                            "val_exit_accuracy": va["exit_accuracy"]}
                write_model_card(out, card.replace(training=training))
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch, best_loss, best_epoch, bad_epochs, cfg)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if show:
                accs = " ".join(f"{100 * a:.1f}" for a in va["exit_accuracy"])
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['loss']:.4f}, val loss {va['loss']:.4f}, "
                      f"val acc per exit [{accs}]{' *' if improved else ''}", flush=True)
        if bad_epochs >= cfg.patience:
            stopped_early = True
            if show:
                print(f"early stop: no validation improvement for {cfg.patience} epochs (best epoch {best_epoch + 1})")
            break

    summary = {"best_epoch": best_epoch + 1, "best_val_loss": best_loss, "stopped_early": stopped_early,
               "epochs_run": len(history), "world_size": world, "history": history}  # fmt: skip
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, state_digest(model))
        summary["ddp_identical_weights"] = len(set(digests)) == 1
    if is_main and (out / "model.safetensors").is_file():
        from ..evaluate.calibrate import calibrate_run
        from ..export.onnx import export_run

        export_run(out, show=show)  # the stage graphs that calibration, evaluation and sealing use

        if world > 1:
            now = read_model_card(out)
            same = summary["ddp_identical_weights"]
            write_model_card(out, now.replace(training={**(now.training or {}), "ddp_identical_weights": same}))
        summary["calibration"] = calibrate_run(out, max_accuracy_drop=cfg.max_accuracy_drop, criterion=cfg.criterion,
                                               device=device, max_batches=cfg.max_batches, val_set=val_ds, show=show)
    if world > 1:
        dist.barrier()
    return summary


def _save_checkpoint(path, model, optimizer, scheduler, epoch, best_loss, best_epoch, bad_epochs, cfg) -> None:
    import io

    buf = io.BytesIO()
    torch.save({
        "arch": model.arch, "model_config": model.config, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
        "config": _jsonable(cfg),
    }, buf)  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))
