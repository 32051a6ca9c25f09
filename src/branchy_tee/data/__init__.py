"""Datasets on plain tensors: CIFAR-10, Fashion-MNIST/MNIST (IDX), and a synthetic graded-difficulty set."""

from __future__ import annotations

from branchy_tee.data.base import ImageDataset, train_val_split
from branchy_tee.data.cifar10 import load_cifar10
from branchy_tee.data.idx import FASHION_MNIST_DIR, fashion_mnist_available, load_fashion_mnist, load_mnist
from branchy_tee.data.synthetic import make_synthetic
from branchy_tee.data.transforms import eval_transform, train_transform
from branchy_tee.train.choices import DATASETS

SYNTHETIC_SIZES = {"train": 10000, "test": 2000}


def load_dataset(
    name: str,
    split: str,
    data_dir=None,
    download: bool = False,
    synthetic: dict | None = None,
) -> ImageDataset:
    """Load ``split`` ('train' or 'test') of a dataset by name. ``synthetic`` holds keyword arguments
    for :func:`make_synthetic` (channels, size, seed, n)."""
    from branchy_tee.core.errors import UsageError

    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, split)
    if name == "mnist":
        if data_dir is None:
            raise UsageError("mnist needs --data-dir (a folder with the four *-ubyte.gz files)")
        return load_mnist(data_dir, split)
    if name == "cifar10":
        if data_dir is None:
            raise UsageError("cifar10 needs --data-dir (the archive cifar-10-python.tar.gz or its folder)")
        return load_cifar10(data_dir, split, download=download)
    if name == "synthetic":
        kw = dict(synthetic or {})
        n = kw.pop("n", None) or SYNTHETIC_SIZES[split]
        return make_synthetic(n, split=split, **kw)
    raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ImageDataset",
    "eval_transform",
    "fashion_mnist_available",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "make_synthetic",
    "train_transform",
    "train_val_split",
]
