"""Training checkpoints (owner side only: read with ``torch.load(weights_only=True)``, never in the
enclave), a separately trained teacher, and a digest of a model's weights."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.fileio import atomic_write_bytes
from branchy_tee.models import create_model
from branchy_tee.models.rundir import load_run


def save_checkpoint(path: Path, model, optimizer, scheduler, progress: dict, config: dict) -> None:
    """Everything a resumed run needs: model, optimizer, scheduler, ``progress`` (epoch, best_loss,
    best_epoch, bad_epochs) and the training options."""
    buf = io.BytesIO()
    state = {
        "arch": model.arch,
        "model_config": model.config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **progress,
        "config": config,
    }
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # owner side only; never in the enclave
    except FileNotFoundError:
        raise BranchyError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise BranchyError(f"{path}: unreadable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "model" not in ckpt:
        raise BranchyError(f"{path}: not a branchy-tee training checkpoint")
    return ckpt


def load_teacher(path: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A separately trained model: a run directory, or a ``checkpoint.pt`` written by this trainer."""
    p = Path(path)
    teacher: Any  # a MultiExitNet (its ``config``)
    if p.is_dir():
        teacher, _ = load_run(p)
    else:
        ckpt = load_checkpoint(p)
        teacher = create_model(ckpt["arch"], **ckpt["model_config"])
        teacher.load_state_dict(ckpt["model"])
    if teacher.config["num_classes"] != num_classes:
        raise BranchyError(f"teacher {path} has {teacher.config['num_classes']} classes, the dataset has {num_classes}")
    return teacher.to(device).eval()


def state_digest(model: torch.nn.Module, keys=None) -> str:
    """SHA-256 over the names and values of the model's state (only ``keys`` when given)."""
    state: dict[str, torch.Tensor] = model.state_dict()
    h = hashlib.sha256()
    for k in sorted(state if keys is None else keys):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
