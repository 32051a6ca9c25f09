"""A labelled image dataset held as one uint8 tensor, and the deterministic train/validation split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from branchy_tee.tee.sealed.preprocessing import Preprocessing


@dataclass
class ImageDataset(Dataset):
    """``images``: uint8 (N, C, H, W); ``labels``: int64 (N,). ``transform`` maps one uint8 image to a
    float tensor. ``mean``/``std`` are the per-channel normalisation constants the model expects
    (on the 0..1 scale), recorded in ``model.json`` so that data owners preprocess the same way."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transform: Optional[Callable] = None
    extras: dict = field(default_factory=dict)  # per-sample side information, e.g. synthetic difficulty

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        x = self.transform(img) if self.transform is not None else img.float().div_(255)
        return x, int(self.labels[i])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        """How a model trained on this data set takes its images (recorded in its model card)."""
        return Preprocessing.for_images(self.input_shape, self.mean, self.std)

    def subset(self, indices, transform: Optional[Callable] = None) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            self.name,
            self.images[idx],
            self.labels[idx],
            self.classes,
            self.mean,
            self.std,
            transform if transform is not None else self.transform,
            {k: v[idx] for k, v in self.extras.items()},
        )


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of ``range(n)`` into (train, validation) indices.

    The validation split is carved from the training set (never from the test set); the same ``n``,
    fraction and seed always give the same split, whatever the global RNG state.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
