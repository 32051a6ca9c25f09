"""MNIST-family datasets from gzipped IDX files (Fashion-MNIST, MNIST).

Debian's ``dataset-fashion-mnist`` installs the four files in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from branchy_tee.core.errors import DatasetError
from branchy_tee.data.base import ImageDataset

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

# Mean/std of the training images on the 0..1 scale (computed over the 60k training images).
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped or raw) of unsigned bytes, checking magic, shape and length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: corrupted or truncated gzip data ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != _UBYTE:
        raise DatasetError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims, dtype=np.int64))
    body = memoryview(data)[4 + 4 * ndim :]
    if len(body) != expected:
        raise DatasetError(f"{path}: expected {expected} data bytes for shape {dims}, found {len(body)} (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_idx_dataset(root: str | os.PathLike[str], split: str, name: str, classes: list[str], stats) -> ImageDataset:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_file, lbl_file = (root / f for f in _FILES[split])
    images = read_idx(img_file)
    labels = read_idx(lbl_file)
    if images.ndim != 3:
        raise DatasetError(f"{img_file}: expected 3 dimensions (N, H, W), found {images.ndim}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{lbl_file}: {len(labels)} labels for {len(images)} images")
    if labels.size and int(labels.max()) >= len(classes):
        raise DatasetError(f"{lbl_file}: label {int(labels.max())} out of range for {len(classes)} classes")
    return ImageDataset(
        name=name,
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(classes),
        mean=stats[0],
        std=stats[1],
    )


def load_fashion_mnist(root=None, split: str = "train") -> ImageDataset:
    return load_idx_dataset(
        root or FASHION_MNIST_DIR, split, "fashion-mnist", FASHION_MNIST_CLASSES, FASHION_MNIST_STATS
    )


def load_mnist(root, split: str = "train") -> ImageDataset:
    return load_idx_dataset(root, split, "mnist", MNIST_CLASSES, MNIST_STATS)


def fashion_mnist_available(root=None) -> bool:
    root = Path(root or FASHION_MNIST_DIR)
    return all((root / f).is_file() for pair in _FILES.values() for f in pair)
