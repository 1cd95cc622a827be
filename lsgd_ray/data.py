"""Datasets as factories returning in-memory tensors, worker shards and the batch stream.

A dataset factory is any picklable callable returning a :class:`Dataset`; it runs inside each
worker (and the evaluator), so each node reads its own copy of the files. Named datasets:

- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 8x8 images): real and offline.
- ``synthetic``: seeded Gaussian class clusters, for tests and benchmarks.
- ``mnist``, ``fashion-mnist``: torchvision's readers of the idx files in ``data_dir``.
- ``cifar10``: the python batches in ``data_dir/cifar-10-batches-py``, with the reference's
  whole-batch crop-and-flip augmentation (``lsgd_ray.augment``).
- ``imagenet``: any torchvision ImageFolder tree (``data_dir/train/<class>/*``,
  ``data_dir/val/<class>/*``), streamed from disk: its splits are :class:`ImageFiles`, decoded a
  batch at a time, never held in memory.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import os
import pickle
import random
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lsgd_ray.augment import AUGMENTS, Augment


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says how to get them."""


@dataclass
class Dataset:
    """Train and test splits as tensors (inputs already normalised, labels int64). Inputs too
    large for memory are :class:`ImageFiles` instead, decoded batch by batch; labels stay tensors."""

    name: str
    x_train: torch.Tensor | ImageFiles
    y_train: torch.Tensor
    x_test: torch.Tensor | ImageFiles
    y_test: torch.Tensor
    num_classes: int
    augment: Augment | None = None  # applied to each training batch; its ``test`` view to the test split

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What the model sees (after the augmentation's crop)."""
        shape = tuple(self.x_train.shape[1:])
        return self.augment.output_shape(shape) if self.augment else shape


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

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state()`` was taken (same shard size)."""
        if len(state["order"]) != self.n:
            raise ValueError(f"batch stream state is for {len(state['order'])} samples, this shard has {self.n}")
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"].clone(), int(state["pos"])


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
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
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


# --------------------------------------------------------------------------- ImageNet, streamed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's ``RandomResizedCrop.get_params``
    (same draws, same fallback), but from ``rng`` instead of torch's process-wide generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fall back to a central crop
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ImageTransform:
    """ImageNet's per-sample transforms up to a uint8 CxHxW tensor (ToTensor's scaling and the
    normalisation follow on the whole batch, in :meth:`ImageFiles.load`: the same arithmetic).

    Training (``train`` and an ``rng`` given): RandomResizedCrop(size) + RandomHorizontalFlip,
    their randomness drawn from ``rng``: torchvision's own transforms draw from torch's
    process-wide generator, which the decoding threads share, so seeding it cannot make a batch
    reproducible. Otherwise the test view: Resize(size·256/224) + CenterCrop(size).
    """

    size: int = 224
    train: bool = False

    @property
    def resize(self) -> int:
        return round(self.size * 256 / 224)

    def __call__(self, image, rng: random.Random | None = None) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        if self.train and rng is not None:
            top, left, height, width = random_resized_crop_box(image.width, image.height, rng)
            image = TF.resized_crop(image, top, left, height, width, [self.size, self.size])
            if rng.random() < 0.5:
                image = TF.hflip(image)
        else:
            image = TF.center_crop(TF.resize(image, self.resize), self.size)
        return TF.pil_to_tensor(image)


def _open_image(path: str):  # noqa: ANN202  (a PIL image)
    from torchvision.datasets.folder import default_loader

    return default_loader(path)


@functools.cache
def _decode_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="lsgd-ray-decode")


def decode_threads() -> int:
    """Threads decoding a batch (PIL releases the GIL while it decodes and resizes):
    ``LSGD_RAY_DECODE_THREADS``, else torch's thread count (a worker's CPUs), at least 2."""
    return int(os.environ.get("LSGD_RAY_DECODE_THREADS", "0")) or max(2, torch.get_num_threads())


Indices = torch.Tensor | np.ndarray | Sequence[int] | slice


class ImageFiles:
    """Image files standing in for an ``x_train``/``x_test`` tensor of shape ``(n, 3, size, size)``.

    Nothing is decoded until a batch is asked for. ``x[indices]`` (indices: a tensor, a list or a
    slice) decodes those images in the test view, one stacked normalised float tensor;
    ``x.load(indices, generator)`` the training view, the batch's random transforms drawn from
    one seed that ``generator`` gives (so a worker's augmentation follows its own seeded
    generator, whatever the threads do). ``subset(indices)`` is another lazy ImageFiles. The
    paths are one NumPy bytes array relative to ``root`` (ImageNet's 1.28 M: ~40 MB).
    """

    def __init__(self, root: str | os.PathLike, files: np.ndarray, transform: ImageTransform) -> None:
        self.root, self.files, self.transform = os.fspath(root), np.asarray(files, dtype=np.bytes_), transform

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), 3, self.transform.size, self.transform.size)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[i]))

    def _positions(self, indices: Indices) -> np.ndarray:
        if isinstance(indices, slice):
            return np.arange(len(self))[indices]
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        return np.asarray(indices, dtype=np.int64).reshape(-1)

    def subset(self, indices: Indices) -> ImageFiles:
        return ImageFiles(self.root, self.files[self._positions(indices)], self.transform)

    def __getitem__(self, indices: Indices) -> torch.Tensor:
        return self.load(indices)

    def load(self, indices: Indices, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode and transform ``indices`` in parallel threads; random (training) transforms
        when this split trains and a ``generator`` is given: sample ``k`` of the batch draws
        from ``random.Random(seed + k)``, ``seed`` taken from ``generator`` once per batch."""
        positions = self._positions(indices)
        seed = None
        if self.transform.train and generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))

        def decode(k: int) -> torch.Tensor:
            rng = None if seed is None else random.Random(seed + k)
            return self.transform(_open_image(self.path(positions[k])), rng)

        images = list(_decode_pool(decode_threads()).map(decode, range(len(positions))))
        if not images:
            return torch.empty(0, *self.shape[1:])
        x = torch.stack(images).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files under {self.root!r}, {self.transform})"


def resident(
    x: torch.Tensor | ImageFiles, device: torch.device, indices: Indices | None = None
) -> torch.Tensor | ImageFiles:
    """What a worker or the evaluator keeps of a split (rows ``indices``, default all): a tensor
    moved to ``device`` (the in-memory fast path), or ImageFiles left on disk (a lazy subset)."""
    if isinstance(x, ImageFiles):
        return x if indices is None else x.subset(indices)
    return (x if indices is None else x[indices]).to(device)


def _imagenet_help(root: Path) -> str:
    return (
        f"ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from https://image-net.org (registration needed) and arrange them in "
        f"torchvision's ImageFolder layout: {root}/train/<class>/*.JPEG (one folder per class, e.g. "
        f"n01440764) and {root}/val/<class>/* with the same class folder names (the usual valprep.sh "
        f"script moves the flat validation images into class folders). Any such tree works, with any "
        f"number of classes."
    )


def _require_imagenet(root: Path) -> list[str]:
    """The sorted class folders of ``root/train``; a DatasetNotFoundError saying how to arrange
    the data when ``train/`` or ``val/`` is missing or has no class folders."""
    problems, classes = [], {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            problems.append(f"{folder} does not exist")
            continue
        classes[split] = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        if not classes[split]:
            problems.append(f"{folder} has no class folders")
    if not problems and not set(classes["val"]) <= set(classes["train"]):
        extra = sorted(set(classes["val"]) - set(classes["train"]))
        problems.append(f"{root / 'val'} has class folders that train/ lacks: {', '.join(extra[:5])}")
    if problems:
        raise DatasetNotFoundError(f"ImageNet not found in {root}: {'; '.join(problems)}. {_imagenet_help(root)}")
    return classes["train"]


def imagenet(data_dir: str | os.PathLike, image_size: int = 224) -> Dataset:
    """An ImageFolder tree (``train/<class>/*``, ``val/<class>/*``; classes: the sorted folder
    names of ``train/``) as streamed :class:`ImageFiles` of ``image_size``-pixel squares, with
    in-memory int64 labels. Each process scans the folders itself (no file list travels)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root = Path(data_dir).expanduser()
    classes = _require_imagenet(root)
    class_to_idx = {name: i for i, name in enumerate(classes)}

    def split(name: str, train: bool) -> tuple[ImageFiles, torch.Tensor]:
        folder = str(root / name)
        samples = make_dataset(folder, class_to_idx, IMG_EXTENSIONS, allow_empty=not train)
        if not samples:
            raise DatasetNotFoundError(f"ImageNet: no images under {folder}. {_imagenet_help(root)}")
        start = len(folder) + 1  # make_dataset joins folder, class and file name
        files = np.array([os.fsencode(path[start:]) for path, _ in samples], dtype=np.bytes_)
        labels = torch.tensor([target for _, target in samples], dtype=torch.int64)
        return ImageFiles(folder, files, ImageTransform(image_size, train)), labels

    return Dataset("imagenet", *split("train", True), *split("val", False), len(classes))


@dataclass(frozen=True)
class DatasetSpec:
    """What the CLI needs to know before loading: shape and classes, plus a suggested batch."""

    input_shape: tuple[int, ...]
    num_classes: int
    needs_data_dir: bool
    default_batch_size: int
    default_augment: str = "none"

    def model_input_shape(self, augment: str | None = None) -> tuple[int, ...]:
        """The input shape models see with ``augment`` (default: the dataset's own)."""
        chosen = AUGMENTS[augment or self.default_augment]
        return chosen.output_shape(self.input_shape) if chosen else self.input_shape


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec((1, 8, 8), 10, False, 32),
    "synthetic": DatasetSpec((16,), 4, False, 32),
    "mnist": DatasetSpec((1, 28, 28), 10, True, 128),
    "fashion-mnist": DatasetSpec((1, 28, 28), 10, True, 128),
    "cifar10": DatasetSpec((3, 32, 32), 10, True, 128, "crop28-flip"),
    # 1000 classes for ILSVRC-2012; ``dataset_spec`` counts the classes of the actual folder
    "imagenet": DatasetSpec((3, 224, 224), 1000, True, 128),
}


def dataset_spec(name: str, data_dir: str | None = None, image_size: int | None = None) -> DatasetSpec:
    """``DATASETS[name]``; for ``imagenet``, with ``image_size`` and the number of class folders
    in ``data_dir/train`` (so a small ImageFolder tree builds a matching model)."""
    spec = DATASETS[name]
    if name != "imagenet":
        return spec
    size = image_size or spec.input_shape[-1]
    classes = spec.num_classes if data_dir is None else len(_require_imagenet(Path(data_dir).expanduser()))
    return replace(spec, input_shape=(3, size, size), num_classes=classes)


def dataset_factory(
    name: str,
    data_dir: str | None = None,
    download: bool = False,
    augment: str | None = None,
    image_size: int | None = None,
) -> DatasetFactory:
    """A picklable factory for a named dataset (see ``DATASETS``). ``augment`` (a name from
    ``lsgd_ray.augment.AUGMENTS``) overrides the dataset's default training augmentation.
    ``image_size`` (imagenet only, default 224): the side of the training crop and test view."""
    from lsgd_ray.config import ConfigError, check_choice

    check_choice("dataset", name, sorted(DATASETS))
    if image_size is not None and name != "imagenet":
        raise ConfigError(f"image_size applies to dataset 'imagenet' only, not {name!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ConfigError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}")
    if name == "imagenet" and augment not in (None, "none"):
        raise ConfigError(
            "dataset 'imagenet' has its own per-sample augmentation (RandomResizedCrop + flip); "
            f"augment {augment!r} applies to in-memory datasets"
        )
    if augment is not None:
        check_choice("augment", augment, list(AUGMENTS))
        shape, chosen = DATASETS[name].input_shape, AUGMENTS[augment]
        if chosen is not None and len(shape) != 3:
            raise ConfigError(f"augment {augment!r} needs image data; dataset {name!r} is not")
        if chosen is not None and chosen.crop is not None and chosen.crop > min(shape[1:]) + 2 * chosen.padding:
            raise ConfigError(f"augment {augment!r} crops {chosen.crop} pixels from {name!r}'s {shape[1:]} images")
        return functools.partial(
            _with_augment, dataset_factory(name, data_dir, download, image_size=image_size), augment
        )
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
    if name == "imagenet":
        if download:
            raise DatasetNotFoundError(_imagenet_help(root))
        _require_imagenet(root)
        return functools.partial(imagenet, data_dir, image_size or DATASETS[name].input_shape[-1])
    if not download:
        _mnist_root(root, _MNIST_LIKE[name][0])
    return functools.partial(mnist_like, name, data_dir, download)


def _with_augment(factory: DatasetFactory, augment: str) -> Dataset:
    data = factory()
    data.augment = AUGMENTS[augment]
    return data
