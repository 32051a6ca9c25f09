"""Channels-last weights: oneDNN's convolutions are faster on channels-last activations on CPUs,
so training and export convert a model's 4-D weights once."""

from __future__ import annotations

from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def channels_last(module: M) -> M:
    """Convert 4-D parameters and buffers to channels-last in place (a no-op for other modules)."""
    # torch's stubs list no memory_format for Module.to, which takes it (documented, and it works)
    converted: M = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return converted
