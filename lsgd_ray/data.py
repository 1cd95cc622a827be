"""Datasets as factories returning in-memory tensors, worker shards and the batch stream.

A dataset factory is any picklable callable returning a :class:`Dataset`; it runs inside each
worker (and the evaluator), so each node reads its own copy of the files. Named datasets:

- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 8x8 images): real and offline.
- ``synthetic``: seeded Gaussian class clusters, for tests and benchmarks.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's datasets from ``data_dir``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says how to get them."""


@dataclass
class Dataset:
    """Train and test splits as tensors (inputs already normalised, labels int64)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


DatasetFactory = Callable[[], Dataset]


# --------------------------------------------------------------------------- sharding & batches


def shard_indices(n: int, num_shards: int, shard: int, seed: int) -> torch.Tensor:
    """Disjoint shards of ``range(n)``: a seeded permutation dealt round-robin."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return permutation[shard::num_shards]


class BatchStream:
    """An endless stream of index batches of a fixed size over ``range(n)``.

    Each epoch is a fresh permutation from the stream's own generator; a batch that crosses an
    epoch boundary takes the rest of one permutation and the start of the next, so every batch
    has the same size and epochs count exactly in samples.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("cannot draw batches from an empty shard")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n, generator=self.generator)
        self._pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self._pos == self.n:
                self._order = torch.randperm(self.n, generator=self.generator)
                self._pos = 0
            take = min(need, self.n - self._pos)
            parts.append(self._order[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "pos": self._pos}


def worker_seed(seed: int, rank: int) -> int:
    """Seed of worker ``rank``'s batch order (model initialisation uses ``seed`` itself)."""
    return seed * 1_000_003 + 7919 * (rank + 1)


# --------------------------------------------------------------------------- named datasets


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


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's copy of the UCI handwritten digits, as 1x8x8 images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
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
        return cache.parent.parent
    missing = [s for s in stems if not (raw / s).exists() and not (raw / f"{s}.gz").exists()]
    raise DatasetNotFoundError(
        f"{folder} not found: {raw} lacks {', '.join(missing)} (decompressed or .gz). "
        f"This machine cannot download it at run time. Copy the four idx files (the originals, "
        f"e.g. train-images-idx3-ubyte.gz) into {raw}, or on a machine with internet run "
        f"`python -m lsgd_ray download {folder.lower() if folder == 'MNIST' else 'fashion-mnist'} "
        f"--data-dir {data_dir}`."
    )


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


def cifar10(data_dir: str | os.PathLike, download: bool = False) -> Dataset:
    """CIFAR-10 through torchvision, as 3x32x32 normalised tensors (augmentation: see experiments)."""
    from torchvision import datasets

    data_dir = Path(data_dir).expanduser()
    if not download:
        _require_cifar10(data_dir)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def convert(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        split = datasets.CIFAR10(str(data_dir), train=train, download=download)
        x = torch.from_numpy(split.data).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std, torch.tensor(split.targets, dtype=torch.int64)

    return Dataset("cifar10", *convert(True), *convert(False), 10)


def _require_cifar10(data_dir: Path) -> None:
    batches = data_dir / "cifar-10-batches-py"
    if not batches.exists():
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {batches} does not exist. This machine cannot download it at run "
            f"time. Extract cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"into {data_dir}, or on a machine with internet run "
            f"`python -m lsgd_ray download cifar10 --data-dir {data_dir}`."
        )


@dataclass(frozen=True)
class DatasetSpec:
    """What the CLI needs to know before loading: shape and classes, plus a suggested batch."""

    input_shape: tuple[int, ...]
    num_classes: int
    needs_data_dir: bool
    default_batch_size: int


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec((1, 8, 8), 10, False, 32),
    "synthetic": DatasetSpec((16,), 4, False, 32),
    "mnist": DatasetSpec((1, 28, 28), 10, True, 128),
    "fashion-mnist": DatasetSpec((1, 28, 28), 10, True, 128),
    "cifar10": DatasetSpec((3, 32, 32), 10, True, 128),
}


def dataset_factory(name: str, data_dir: str | None = None, download: bool = False) -> DatasetFactory:
    """A picklable factory for a named dataset (see ``DATASETS``)."""
    from lsgd_ray.config import ConfigError, check_choice

    check_choice("dataset", name, sorted(DATASETS))
    if name == "digits":
        return digits
    if name == "synthetic":
        return synthetic
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} needs a data directory (--data-dir)")
    root = Path(data_dir).expanduser()
    # Look for the files now, in the driver, so a missing dataset is reported before any actor
    # starts (this also decompresses MNIST-style .gz files once, before workers read them).
    if name == "cifar10":
        if not download:
            _require_cifar10(root)
        return functools.partial(cifar10, data_dir, download)
    if not download:
        _mnist_root(root, _MNIST_LIKE[name][0])
    return functools.partial(mnist_like, name, data_dir, download)
