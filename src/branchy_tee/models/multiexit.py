"""The multi-exit network container shared by every model family."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class MultiExitNet(nn.Module):
    """A backbone cut into ``stages`` with one classifier per stage in ``exits``.

    ``exits[k]`` classifies the output of ``stages[k]``; the last exit is the final classifier.
    ``forward`` returns one logits tensor per exit, final last. Running the stages one after another
    (``run_stage``) gives exactly the same logits, which is what the enclave runtime relies on.
    """

    def __init__(self, stages: Sequence[nn.Module], exits: Sequence[nn.Module]):
        super().__init__()
        # Filled in by create_model: the registered name and the keyword arguments that rebuild it.
        self.arch = ""
        self.config: dict = {}
        if len(stages) != len(exits):
            raise ValueError(f"{len(stages)} stages but {len(exits)} exits")
        if len(stages) < 2:
            raise ValueError("a multi-exit network needs at least two exits")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        # Training only: the factor on the gradient each early exit sends back into the shared
        # backbone (MSDNet's and IMTA's gradient scaling); the heads themselves get their full
        # gradient. Not a weight: it changes nothing in eval mode and is not saved.
        self.exit_grad_scale = 1.0

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def run_stage(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features after stage ``k`` and the logits of exit ``k``."""
        h = self.stages[k](h)
        return h, self.exits[k](h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        h = x
        scale = self.exit_grad_scale if self.training else 1.0
        for k, (stage, head) in enumerate(zip(self.stages, self.exits, strict=True)):
            h = stage(h)
            early = k < len(self.exits) - 1
            outputs.append(head(_ScaleGrad.apply(h, scale) if early and scale != 1.0 and h.requires_grad else h))
        return outputs
