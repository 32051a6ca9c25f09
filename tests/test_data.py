import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch

from branchy_tee.core.errors import DatasetError
from branchy_tee.data import cifar10 as cifar_mod
from branchy_tee.data import (
    fashion_mnist_available,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
    train_transform,
    train_val_split,
)
from branchy_tee.data.idx import load_mnist, read_idx
from branchy_tee.tee.sealed.preprocessing import Preprocessing

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------- CIFAR-10
def _batch(n, seed):
    rng = np.random.default_rng(seed)
    # Keys are bytes and data is (N, 3072) uint8, row-major R, G, B planes: the official layout.
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar_tarball(path, per_batch=4, corrupt=None):
    batches = {f"data_batch_{i}": _batch(per_batch, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(per_batch, 99)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [("batches.meta", meta), *batches.items()]:
            data = pickle.dumps(obj, protocol=2)
            if corrupt == name:
                data = data[: len(data) // 2]
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


def test_cifar_tarball_loads_in_official_layout(tmp_path):
    batches = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    train = load_cifar10(tmp_path, "train")
    test = load_cifar10(tmp_path / "cifar-10-python.tar.gz", "test")
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 3, 32, 32)
    assert train.classes == CIFAR_NAMES
    first = batches["data_batch_1"]
    # Channel planes: the first 1024 bytes are the red plane of image 0.
    assert train.images[0, 0].flatten().tolist() == first[b"data"][0, :1024].tolist()
    assert train.images[0, 2].flatten().tolist() == first[b"data"][0, 2048:].tolist()
    assert train.labels[:4].tolist() == first[b"labels"]


def test_cifar_extracted_folder(tmp_path):
    write_cifar_tarball(tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    ds = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert len(ds) == 4


def test_cifar_truncated_batch_names_the_file(tmp_path):
    write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", corrupt="data_batch_3")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_cifar_truncated_archive(tmp_path):
    write_cifar_tarball(tmp_path / "full.tar.gz")
    raw = (tmp_path / "full.tar.gz").read_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "cifar-10-python.tar.gz", "train")


def test_cifar_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Evil()]}))
    with pytest.raises(DatasetError, match="forbidden global"):
        load_cifar10(folder, "test")


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetError, match="--download"):
        load_cifar10(tmp_path, "train")


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar_download_verifies_checksum(http_dir, tmp_path):
    served, base = http_dir
    write_cifar_tarball(served / "cifar-10-python.tar.gz")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        cifar_mod.download_cifar10(dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32)
    assert not (dest / "cifar-10-python.tar.gz").exists()
    assert list(dest.iterdir()) == []  # nothing half-written
    path = cifar_mod.download_cifar10(dest, url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    assert len(load_cifar10(path, "test")) == 4


# ---------------------------------------------------------------------------- IDX
def write_idx(path, array, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_idx_set(root, n_train=6, n_test=3):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, gz=False)
    assert (read_idx(tmp_path / "a.gz") == arr).all()
    assert (read_idx(tmp_path / "b") == arr).all()


def test_idx_dataset(tmp_path):
    write_idx_set(tmp_path)
    train = load_mnist(tmp_path, "train")
    test = load_mnist(tmp_path, "test")
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert train.labels.dtype == torch.int64


def test_idx_truncated_and_corrupted(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(tmp_path, "train")
    path.write_bytes(gzip.compress(raw)[:-20])  # a cut gzip stream
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, "train")
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, "train")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz.*not found"):
        load_mnist(tmp_path, "test")


def test_idx_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(DatasetError, match="2 labels for 3 images"):
        load_mnist(tmp_path, "test")


@pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST not installed (apt install dataset-fashion-mnist)"
)
def test_real_fashion_mnist():
    train = load_fashion_mnist(split="train")
    test = load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert abs(float(train.images.float().mean() / 255) - train.mean[0]) < 1e-3


# ---------------------------------------------------------------------------- synthetic, transforms, split
def test_synthetic_is_deterministic_and_graded():
    a = make_synthetic(400, split="train", channels=1, size=28, seed=3)
    b = make_synthetic(400, split="train", channels=1, size=28, seed=3)
    c = make_synthetic(400, split="test", channels=1, size=28, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images[:50], c.images[:50])
    assert a.images.shape == (400, 1, 28, 28)
    # Easy samples sit close to their class mean, hard ones far from it.
    x = a.images.float().flatten(1)
    centroids = torch.stack([x[a.labels == k].mean(0) for k in range(10)])
    dist = (x - centroids[a.labels]).norm(dim=1)
    d = a.extras["difficulty"]
    assert dist[d < 0.2].mean() < 0.6 * dist[d > 0.8].mean()


def test_transforms_shapes_and_randomness():
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32).remainder(256).to(torch.uint8)
    t = train_transform(Preprocessing.for_images((3, 32, 32), (0.5,) * 3, (0.25,) * 3), size=32, padding=4)
    outs = [t(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # crops/flips differ


@pytest.mark.parametrize("channels,scale", [(1, 1 / 255), (3, 1 / 255), (3, 1 / 510)])
def test_training_and_inference_preprocess_images_identically(tmp_path, channels, scale):
    """The same uint8 images become bit-identical inputs wherever the model card's preprocessing is
    applied: the training set's transform (crop and flip switched off), evaluation's, and the data
    owners' (encrypt-input from a tensor file or from PNG files, the online client's PIL images and
    arrays); its scale is the one applied (1/255: x / 255, as training always divided)."""
    from PIL import Image

    from branchy_tee.data.base import ImageDataset
    from branchy_tee.data.preprocess import image_to_pixels, load_inputs, tensor_to_inputs
    from branchy_tee.data.transforms import eval_transform

    images = torch.from_numpy(np.random.default_rng(channels).integers(0, 256, (6, channels, 20, 20), dtype=np.uint8))
    images[0] = torch.arange(400).remainder(256).view(20, 20)  # every pixel value
    ds = ImageDataset("x", images, torch.zeros(6, dtype=torch.long), ["a"], (0.3,) * channels, (0.2,) * channels)
    pre = Preprocessing(ds.preprocessing.input_shape, scale, ds.preprocessing.mean, ds.preprocessing.std)
    mean, std = torch.tensor(pre.mean).view(-1, 1, 1), torch.tensor(pre.std).view(-1, 1, 1)
    expected = (images.float() / round(1 / scale) - mean) / std
    training = ds.subset(range(6), train_transform(pre, size=20, padding=0, flip=False))
    evaluation = ds.subset(range(6), eval_transform(pre))
    np.save(tmp_path / "x.npy", images.numpy())
    pngs = []
    for i, img in enumerate(images.numpy()):
        pngs.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img[0] if channels == 1 else img.transpose(1, 2, 0)).save(pngs[-1])
    pil = [Image.open(p) for p in pngs]
    paths = {
        "training": torch.stack([training[i][0] for i in range(6)]),
        "evaluation": torch.stack([evaluation[i][0] for i in range(6)]),
        "encrypt-input, tensor file": load_inputs([str(tmp_path / "x.npy")], pre),
        "encrypt-input, PNG files": load_inputs(pngs, pre),
        "client, PIL images": tensor_to_inputs(
            torch.stack([image_to_pixels(im, pre.input_shape) for im in pil]), pre, "x"
        ),
        "client, array": tensor_to_inputs(images, pre, "x"),
    }
    for where, x in paths.items():
        assert x.dtype == torch.float32 and torch.equal(x, expected), where


def test_split_is_deterministic_and_disjoint():
    tr, va = train_val_split(1000, 0.1, seed=5)
    tr2, va2 = train_val_split(1000, 0.1, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist())


def test_load_dataset_errors():
    from branchy_tee.core.errors import UsageError

    with pytest.raises(UsageError, match="choose one of"):
        load_dataset("imagenet", "train")
    with pytest.raises(UsageError, match="--data-dir"):
        load_dataset("cifar10", "train")
