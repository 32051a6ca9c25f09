"""A deterministic synthetic image dataset with graded difficulty.

Every class has a smooth random prototype. A sample of difficulty d in [0, 1] is its class prototype
blended with a distractor class (weight 0.47·d), shifted by up to 5·d pixels, plus noise growing with d.
Easy samples (small d) are nearly clean prototypes that an early exit can take; hard ones need the
deeper stages. Same arguments, same bytes: the generator is seeded from (seed, split) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from branchy_tee.data.base import ImageDataset

SYNTHETIC_CLASSES = [f"class-{i}" for i in range(10)]


def _prototypes(num_classes: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    # Low-frequency patterns: a coarse random grid, upsampled; then stretched to 0..1.
    coarse = torch.rand(num_classes, channels, 5, 5, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    lo = protos.amin(dim=(1, 2, 3), keepdim=True)
    hi = protos.amax(dim=(1, 2, 3), keepdim=True)
    return (protos - lo) / (hi - lo)


def make_synthetic(
    n: int,
    split: str = "train",
    channels: int = 3,
    size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> ImageDataset:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    # The prototypes depend on the seed only, so train and test share classes; samples differ per split.
    protos = _prototypes(num_classes, channels, size, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1_000_003 + (1 if split == "test" else 2))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    w = (0.47 * difficulty).view(n, 1, 1, 1)
    x = (1 - w) * protos[labels] + w * protos[other]
    # Cyclic integer translation of each sample by up to 5·d pixels, as one gather.
    shifts = ((torch.rand(n, 2, generator=g) * 2 - 1) * 5 * difficulty.unsqueeze(1)).round().long()
    ar = torch.arange(size)
    rows = (ar.view(1, -1) - shifts[:, :1]) % size
    cols = (ar.view(1, -1) - shifts[:, 1:]) % size
    x = x[
        torch.arange(n).view(-1, 1, 1, 1),
        torch.arange(channels).view(1, -1, 1, 1),
        rows.view(n, 1, size, 1),
        cols.view(n, 1, 1, size),
    ]
    x = x + torch.randn(x.shape, generator=g) * (0.05 + 0.45 * difficulty).view(n, 1, 1, 1)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    mean = tuple(float(m) for m in images.float().div(255).mean(dim=(0, 2, 3))) if n else (0.5,) * channels
    std = (
        tuple(max(float(s), 1e-3) for s in images.float().div(255).std(dim=(0, 2, 3))) if n > 1 else (0.25,) * channels
    )
    return ImageDataset(
        name="synthetic",
        images=images,
        labels=labels,
        classes=SYNTHETIC_CLASSES[:num_classes] if num_classes <= 10 else [f"class-{i}" for i in range(num_classes)],
        mean=mean,
        std=std,
        extras={"difficulty": difficulty},
    )
