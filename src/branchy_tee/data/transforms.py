"""Image transforms on plain tensors (no torchvision): scale, crop with padding, flip, normalise.

Each transform takes and returns one image tensor (C, H, W), or a batch (N, C, H, W) where it is not
random. Randomness comes from torch's global RNG, which DataLoader seeds per worker, so runs are
reproducible under ``torch.manual_seed``.

Scaling and normalising are the model's preprocessing (``tee.sealed.preprocessing.Preprocessing``, recorded in
its model card and bundle header): :func:`eval_transform` is the one way raw images become inputs,
in training, evaluation, ``encrypt-input`` and the online client alike (``data.preprocess``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from branchy_tee.tee.sealed.preprocessing import Preprocessing


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


class Scale:
    """Pixels (uint8) -> float32 on the 0..1 scale: divided by 1/scale (exactly 255 for uint8)."""

    def __init__(self, pre: Preprocessing):
        self.divisor = pre.divisor

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().div_(self.divisor)


class Normalize:
    """0..1 values -> the model's input: (x - mean) / std per channel."""

    def __init__(self, pre: Preprocessing):
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)

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


def eval_transform(pre: Preprocessing) -> Compose:
    """Raw pixels (uint8) -> the model's input, exactly as the model card says."""
    return Compose([Scale(pre), Normalize(pre)])


def train_transform(pre: Preprocessing, size: int, padding: int = 4, flip: bool = True) -> Compose:
    """The same, with a random crop (zero padding on the 0..1 scale) and flip between the two steps."""
    steps: list[Callable] = [Scale(pre), RandomCrop(size, padding)]
    if flip:
        steps.append(RandomHorizontalFlip())
    steps.append(Normalize(pre))
    return Compose(steps)
