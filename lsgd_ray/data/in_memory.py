"""Datasets held in memory: seeded synthetic clusters, scikit-learn's digits, the MNIST-style
idx files and the CIFAR-10 python batches."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from lsgd_ray.augment import AUGMENTS
from lsgd_ray.data.core import Dataset, DatasetFileError, DatasetNotFoundError


def synthetic(
    n_train: int = 2048, n_test: int = 512, dim: int = 16, num_classes: int = 4, noise: float = 1.0, seed: int = 0
) -> Dataset:
    """Gaussian clusters around random class centres: learnable, not trivially (chance 1/classes)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 1.5

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        return centres[y] + noise * torch.randn(n, dim, generator=g), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


def random_images(n_train: int = 8192, n_test: int = 1024, seed: int = 0) -> Dataset:
    """MNIST-shaped random data for throughput runs (what the pixels are does not matter there);
    a module-level factory, so Ray workers can import it."""
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        "random-images",
        torch.randn(n_train, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randn(n_test, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        10,
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' 8x8 images and labels, read straight from the file scikit-learn ships: importing
    sklearn costs every worker about a second of CPU, and the tests start hundreds of them."""
    spec = importlib.util.find_spec("sklearn")
    where = spec.submodule_search_locations if spec else None
    path = Path(where[0], "datasets", "data", "digits.csv.gz") if where else None
    if path is None or not path.exists():  # another layout: let sklearn find it
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's copy of the UCI handwritten digits, as 1x8x8 images scaled to [0, 1]."""
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


_MNIST_LIKE = {
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("LSGD_RAY_CACHE", Path.home() / ".cache" / "lsgd_ray"))


def _mnist_root(data_dir: Path, folder: str) -> Path:
    """A root under which torchvision finds ``folder/raw`` decompressed.

    torchvision reads the decompressed idx files; when only the original ``.gz`` files are there
    (possibly on a read-only share) they are decompressed once into a cache of our own.
    """
    raw = data_dir / folder / "raw"
    stems = [
        f"{prefix}-{kind}-idx{dims}-ubyte"
        for prefix in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    ]
    if all((raw / stem).exists() for stem in stems):
        for stem in stems:
            check_idx(raw / stem)
        return data_dir
    if all((raw / f"{stem}.gz").exists() for stem in stems):
        key = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:16]
        cache = _cache_dir() / "decompressed" / key / folder / "raw"
        cache.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            target = cache / stem
            if not target.exists():
                tmp = target.with_name(f"{stem}.{os.getpid()}.part")  # workers race here
                with gzip.open(raw / f"{stem}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.rename(target)
            check_idx(target)
        return cache.parent.parent
    missing = [s for s in stems if not (raw / s).exists() and not (raw / f"{s}.gz").exists()]
    raise DatasetNotFoundError(
        f"{folder} not found: {raw} lacks {', '.join(missing)} (decompressed or .gz). "
        f"This machine cannot download it at run time. Copy the four idx files (the originals, "
        f"e.g. train-images-idx3-ubyte.gz) into {raw}, or on a machine with internet run "
        f"`python -m lsgd_ray download {folder.lower() if folder == 'MNIST' else 'fashion-mnist'} "
        f"--data-dir {data_dir}`."
    )


def check_idx(path: Path) -> None:
    """An idx file (MNIST's format) whose header matches its name and its length: magic
    ``0x00000800 + dims`` (unsigned bytes), then ``dims`` big-endian sizes, then their product in
    bytes. Raises ``DatasetFileError`` naming the file otherwise."""
    dims = 3 if "images" in path.name else 1
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * dims)
    if len(header) < 4 + 4 * dims or header[:4] != bytes([0, 0, 8, dims]):
        raise DatasetFileError(f"{path}: not an idx file of {dims}-D unsigned bytes (header {header[:4].hex()})")
    shape = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    expected = 4 + 4 * dims + math.prod(shape)
    if size != expected:
        raise DatasetFileError(f"{path}: {size} bytes where its header {shape} says {expected} (truncated or damaged)")


def mnist_like(name: str, data_dir: str | os.PathLike, download: bool = False) -> Dataset:
    """MNIST or Fashion-MNIST through torchvision, as 1x28x28 normalised tensors."""
    from torchvision import datasets

    folder, mean, std = _MNIST_LIKE[name]
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    data_dir = Path(data_dir).expanduser()
    root = data_dir if download else _mnist_root(data_dir, folder)
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=download)

    def convert(split) -> tuple[torch.Tensor, torch.Tensor]:
        x = (split.data.float().unsqueeze(1) / 255.0 - mean[0]) / std[0]
        return x, split.targets.long()

    return Dataset(name, *convert(train), *convert(test), 10)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches' dicts of arrays and lists, and refuses anything else: a
    pickle can name any callable, and a data file must not run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file: (N x 3 x 32 x 32 uint8 images, N int64 labels)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    except Exception as exc:  # a damaged pickle fails in any of a dozen ways; none runs code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetFileError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {first})") from None
    if len(labels) != len(data):
        raise DatasetFileError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar10(data_dir: str | os.PathLike, download: bool = False, augment: str = "crop28-flip") -> Dataset:
    """CIFAR-10 from its python batches (``cifar-10-batches-py``) as 3x32x32 normalised tensors.

    The batches are read by our own restricted unpickler (not torchvision's, which checks the
    files' MD5 sums and unpickles without restriction). ``augment`` names an entry of
    ``lsgd_ray.augment.AUGMENTS``; the default is the reference's random 28x28 crop + flip.
    """
    data_dir = Path(data_dir).expanduser()
    if download:
        from torchvision import datasets

        datasets.CIFAR10(str(data_dir), train=True, download=True)
    _require_cifar10(data_dir)
    folder = data_dir / "cifar-10-batches-py"
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_batch(folder / name) for name in names]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255.0
        return (x - mean) / std, torch.from_numpy(np.concatenate([p[1] for p in parts]))

    train = load([f"data_batch_{i}" for i in range(1, 6)])
    test = load(["test_batch"])
    return Dataset("cifar10", *train, *test, 10, augment=AUGMENTS[augment])


def _require_cifar10(data_dir: Path) -> None:
    batches = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (batches / n).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {batches} lacks {', '.join(missing)}. This machine cannot download "
            f"it at run time. Extract cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"into {data_dir}, or on a machine with internet run "
            f"`python -m lsgd_ray download cifar10 --data-dir {data_dir}`."
        )
