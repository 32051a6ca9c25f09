"""Attach early exits to a trained model (the "IC-only" training of SDN, Kaya et al. 2019).

The backbone and the final classifier come from a trained model and stay frozen: they get no
gradient, and they run in eval mode, so that BatchNorm's running statistics do not move either.
Only the early-exit heads learn, from the labels and from the frozen final exit (distillation).
The final exit of the result therefore computes exactly what the source model computed (same
weights, same statistics, same logits bit for bit): the full model's accuracy cannot drop.

Sources: a run directory of this project (``--attach-exits RUN_DIR``; its early-exit heads are the
starting point and its data set and validation split are reused, so that calibration sees no sample
the backbone was trained on), or a plain single-exit state dict for ``--net``
(``--backbone-weights FILE``; fresh heads; names as in ``models.plain``).
"""

from __future__ import annotations

from typing import cast

from branchy_tee.core.errors import UsageError
from branchy_tee.models import create_model, resolve_name
from branchy_tee.models.card import DataSpec, ModelCard
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.plain import backbone_keys, load_plain_weights, read_state_dict
from branchy_tee.models.rundir import load_run
from branchy_tee.train.checkpoint import state_digest


def is_attaching(cfg) -> bool:
    return bool(cfg.attach_exits or cfg.backbone_weights)


def check_options(cfg) -> None:
    if cfg.attach_exits and cfg.backbone_weights:
        raise UsageError("--attach-exits and --backbone-weights are two sources for the same thing; give one")
    if cfg.attach_exits and cfg.model_config:
        raise UsageError("--attach-exits takes the architecture and its options from the run; drop --model-config")


def source_data(cfg, source: ModelCard) -> DataSpec:
    """The source run's data set and validation split (its model card's ``data``)."""
    if source.data is None:
        raise UsageError(
            f"--attach-exits: {cfg.attach_exits}/model.json does not say how its validation split was made"
        )
    if cfg.dataset not in (None, source.data.dataset):
        raise UsageError(f"--attach-exits: {cfg.attach_exits} was trained on {source.data.dataset}, not {cfg.dataset}")
    return source.data


def source_model(cfg, input_shape, num_classes: int) -> tuple[MultiExitNet, dict]:
    """The model to train, its backbone and final exit loaded from the source (not yet frozen), and
    a record of where they came from for the model card."""
    if cfg.attach_exits:
        loaded, card = load_run(cfg.attach_exits)
        model = cast(MultiExitNet, loaded)
        if cfg.net and resolve_name(cfg.net) != card.arch:
            raise UsageError(f"--attach-exits: {cfg.attach_exits} is a {card.arch}, not {resolve_name(cfg.net)}")
        record = {"run": str(cfg.attach_exits), "naming": "branchy-tee"}
    else:
        model = create_model(
            resolve_name(cfg.net or "mobilenetv1"),
            num_classes=num_classes,
            in_channels=input_shape[0],
            **cfg.model_config,
        )
        naming = load_plain_weights(model, read_state_dict(cfg.backbone_weights), cfg.backbone_weights)
        record = {"weights": str(cfg.backbone_weights), "naming": naming}
    record["backbone_sha256"] = backbone_digest(model)
    return model, record


def backbone_digest(model) -> str:
    """SHA-256 over the backbone's and the final exit's names and values (what must not change)."""
    return state_digest(model, backbone_keys(model))


def freeze_backbone(model) -> None:
    for part in (model.stages, model.exits[-1]):
        for p in part.parameters():
            p.requires_grad_(False)


def set_train_mode(model, frozen: bool) -> None:
    """Train mode, except the frozen parts, which stay in eval mode (BatchNorm statistics fixed)."""
    model.train()
    if frozen:
        inner = getattr(model, "module", model)  # under DistributedDataParallel
        inner.stages.eval()
        inner.exits[-1].eval()
