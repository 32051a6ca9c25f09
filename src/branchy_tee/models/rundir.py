"""The run directory a training run writes and later steps read.

``model.safetensors`` (weights, never pickle), ``model.json`` (the model card: architecture, config,
classes, preprocessing, exit criterion and thresholds; ``models.card.ModelCard``), ``checkpoint.pt``
(resumable training state, owner side only) and ``metrics.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.fileio import atomic_write_bytes, atomic_write_text
from branchy_tee.models import create_model
from branchy_tee.models.card import ModelCard
from branchy_tee.models.layout import channels_last

MODEL_CARD = "model.json"


def write_weights(path: Path, model: torch.nn.Module) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(state))


def write_model_card(run_dir: str | Path, card: ModelCard) -> None:
    atomic_write_text(Path(run_dir) / MODEL_CARD, json.dumps(card.to_json(), indent=2) + "\n")


def read_model_card(run_dir: str | Path) -> ModelCard:
    run_dir = Path(run_dir)
    path = run_dir / MODEL_CARD
    if not run_dir.is_dir():
        raise BranchyError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise BranchyError(f"{run_dir}: not a branchy-tee run directory (no {MODEL_CARD})")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BranchyError(f"{path}: not valid JSON ({e})") from None
    return ModelCard.parse(doc, str(path))


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, ModelCard]:
    """The trained model (eval mode, channels-last weights) and its model card."""
    run_dir = Path(run_dir)
    card = read_model_card(run_dir)
    model = create_model(card.arch, **card.config)
    path = run_dir / "model.safetensors"
    try:
        state = st_load(path.read_bytes())
    except FileNotFoundError:
        raise BranchyError(f"{path}: missing (was training interrupted before the first epoch ended?)") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BranchyError(f"{path}: unreadable weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise BranchyError(f"{path}: weights do not fit {card.arch} ({first})") from None
    return channels_last(model).eval(), card
