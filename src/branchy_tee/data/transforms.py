"""Image transforms on plain tensors (no torchvision): crop with padding, flip, normalise.

Each transform takes and returns one image tensor (C, H, W). Randomness comes from torch's global
RNG, which DataLoader seeds per worker, so runs are reproducible under ``torch.manual_seed``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1."""
    return img.float().div_(255.0)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop a random ``size x size`` window."""

    def __init__(self, size: int, padding: int = 4):
        self.size, self.padding = size, padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return x[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand(()) < self.p else x


def eval_transform(mean, std) -> Compose:
    return Compose([to_float, Normalize(mean, std)])


def train_transform(mean, std, size: int, padding: int = 4, flip: bool = True) -> Compose:
    steps: list[Callable] = [to_float, RandomCrop(size, padding)]
    if flip:
        steps.append(RandomHorizontalFlip())
    steps.append(Normalize(mean, std))
    return Compose(steps)
