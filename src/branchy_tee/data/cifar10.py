"""CIFAR-10 from the official "python version" archive (cifar-10-python.tar.gz) or its extracted folder.

The official batches are Python pickles. They are read with a restricted unpickler that can build
only plain containers and numpy arrays, so a doctored archive cannot run code. The archive is read in
place (no extraction); ``download_cifar10`` fetches it and checks its MD5 before it is used.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from branchy_tee.core.errors import DatasetError
from branchy_tee.data.base import ImageDataset

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any malformed pickle is a corrupted file, whatever the exception
        raise DatasetError(f"{where}: corrupted CIFAR-10 batch ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: not a CIFAR-10 batch (top level is {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _Source:
    """Reads members of the archive or the extracted folder by name."""

    def __init__(self, root: Path):
        self.tar = None
        self.folder = None
        candidates = [root, root / ARCHIVE, root / FOLDER]
        for c in candidates:
            if c.is_file():
                try:
                    self.tar = tarfile.open(c, "r:*")
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise DatasetError(f"{c}: not a readable CIFAR-10 archive ({e})") from None
                self.where = c
                return
            if c.is_dir() and (c / "batches.meta").is_file():
                self.folder, self.where = c, c
                return
        raise DatasetError(
            f"CIFAR-10 not found at {root} (expected {ARCHIVE} or a {FOLDER}/ folder); "
            "use --download when online, or fetch it from " + URL
        )

    def read(self, name: str) -> tuple[bytes, str]:
        if self.folder is not None:
            path = self.folder / name
            try:
                return path.read_bytes(), str(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: missing CIFAR-10 file") from None
        where = f"{self.where}:{FOLDER}/{name}"
        assert self.tar is not None  # no folder: __init__ opened the archive
        try:
            member = self.tar.extractfile(f"{FOLDER}/{name}")
            if member is None:
                raise KeyError(name)
            return member.read(), where
        except KeyError:
            raise DatasetError(f"{where}: missing from the archive") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"{where}: truncated or corrupted archive ({e})") from None

    def close(self):
        if self.tar is not None:
            self.tar.close()


def load_cifar10(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> ImageDataset:
    """Load the train (50k) or test (10k) split from ``root`` (archive, folder, or a folder holding either)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if download and not (root / ARCHIVE).is_file() and not (root / FOLDER).is_dir() and not root.is_file():
        download_cifar10(root)
    src = _Source(root)
    try:
        meta_bytes, where = src.read("batches.meta")
        meta = _unpickle(meta_bytes, where)
        names = meta.get("label_names")
        if not isinstance(names, list) or not names:
            raise DatasetError(f"{where}: no label_names")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        images, labels = [], []
        for batch in TRAIN_BATCHES if split == "train" else TEST_BATCHES:
            data, where = src.read(batch)
            d = _unpickle(data, where)
            x, y = d.get("data"), d.get("labels")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                raise DatasetError(f"{where}: 'data' is not a uint8 array of shape (N, 3072)")
            if not isinstance(y, list) or len(y) != len(x):
                raise DatasetError(f"{where}: {0 if not isinstance(y, list) else len(y)} labels for {len(x)} images")
            y = np.asarray(y, dtype=np.int64)
            if y.size and (y.min() < 0 or y.max() >= len(classes)):
                raise DatasetError(f"{where}: label out of range for {len(classes)} classes")
            images.append(x.reshape(-1, 3, 32, 32))
            labels.append(y)
    finally:
        src.close()
    return ImageDataset(
        name="cifar10",
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        mean=CIFAR10_STATS[0],
        std=CIFAR10_STATS[1],
    )


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_cifar10(root: str | os.PathLike[str], url: str = URL, md5: str = ARCHIVE_MD5) -> Path:
    """Fetch the archive into ``root`` and verify its MD5; nothing is left behind on failure."""
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / ARCHIVE
    fd, tmp = tempfile.mkstemp(prefix=f".{ARCHIVE}.", dir=root)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {ARCHIVE}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        got = md5sum(Path(tmp))
        if got != md5:
            raise DatasetError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); download discarded")
        os.replace(tmp, dest)
    except OSError as e:
        raise DatasetError(f"{url}: download failed ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
