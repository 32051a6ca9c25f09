"""What it costs to reach each exit: FLOPs counted by ``torch.utils.flop_counter``, parameter counts."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .multiexit import MultiExitNet
from .registry import create_model


def _count_flops(fn, *args) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops(), out


@torch.no_grad()
def exit_flops(model: MultiExitNet, input_shape=(3, 32, 32)) -> list[int]:
    """Cumulative FLOPs (multiply-add = 2) to reach each exit for one input: stages 0..k plus head k.

    Counted on a single sample in eval mode, so BatchNorm and pooling are not counted (the counter
    covers convolutions and matrix products, which dominate).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    h = torch.zeros(1, *input_shape, device=device)
    backbone, cumulative = 0, []
    for stage, head in zip(model.stages, model.exits):
        stage_flops, h = _count_flops(stage, h)
        head_flops, _ = _count_flops(head, h)
        backbone += stage_flops
        cumulative.append(backbone + head_flops)
    model.train(was_training)
    return cumulative


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
