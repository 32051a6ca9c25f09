"""What it costs to reach each exit: FLOPs counted by ``torch.utils.flop_counter``, parameter counts.

Two views of the same numbers:
- ``exit_flops[k]``: stages 0..k plus head k — the cost of a network that is cut at exit k
  (what ``branchy-tee models`` reports; the last entry is the plain full model).
- ``early_exit_cost(...)[k]``: stages 0..k plus *every* head 0..k — what a sample that leaves at exit k
  costs in an early-exit run, which evaluated the heads it passed on the way.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import create_model


def _count_flops(fn, *args) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops(), out


@torch.no_grad()
def part_flops(model: MultiExitNet, input_shape=(3, 32, 32)) -> tuple[list[int], list[int]]:
    """(FLOPs of each stage, FLOPs of each head) for one input; multiply-add = 2 FLOPs.

    Counted in eval mode on one sample; the counter covers convolutions and matrix products,
    which dominate (BatchNorm, activations and pooling are not counted).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    h = torch.zeros(1, *input_shape, device=device)
    stages, heads = [], []
    for stage, head in zip(model.stages, model.exits, strict=True):
        f, h = _count_flops(stage, h)
        stages.append(f)
        heads.append(_count_flops(head, h)[0])
    model.train(was_training)
    return stages, heads


def exit_flops_from_parts(stage_flops: Sequence[int], head_flops: Sequence[int]) -> list[int]:
    return [sum(stage_flops[: k + 1]) + head_flops[k] for k in range(len(stage_flops))]


def early_exit_cost(stage_flops: Sequence[int], head_flops: Sequence[int]) -> list[int]:
    return [sum(stage_flops[: k + 1]) + sum(head_flops[: k + 1]) for k in range(len(stage_flops))]


def exit_flops(model: MultiExitNet, input_shape=(3, 32, 32)) -> list[int]:
    """Cumulative FLOPs to reach each exit: stages 0..k plus head k."""
    return exit_flops_from_parts(*part_flops(model, input_shape))


def arch_part_flops(arch: str, config: dict, input_shape) -> tuple[list[int], list[int]]:
    """``part_flops`` of an architecture, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = create_model(arch, **config)
    return part_flops(model, tuple(input_shape))


def param_counts(model: MultiExitNet) -> tuple[int, int]:
    """(backbone parameters, early-exit head parameters). The final classifier counts as backbone."""
    backbone = sum(p.numel() for p in model.stages.parameters())
    backbone += sum(p.numel() for p in model.exits[-1].parameters())
    heads = sum(p.numel() for h in model.exits[:-1] for p in h.parameters())
    return backbone, heads


def describe_model(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> dict:
    # On the meta device nothing is allocated or initialised; shapes, and so FLOPs, are exact.
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    backbone, heads = param_counts(model)
    tensors = list(model.parameters()) + list(model.buffers())
    size_bytes = sum(t.numel() * 4 for t in tensors if t.is_floating_point())
    return {
        "name": model.arch,
        "params": backbone + heads,
        "backbone_params": backbone,
        "head_params": heads,
        "exits": model.num_exits,
        "exit_flops": exit_flops(model, (in_channels, input_size, input_size)),
        "size_mib": size_bytes / 2**20,
    }
