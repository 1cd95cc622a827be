"""ImageNet-style ImageFolder trees, streamed from disk a batch at a time, never held in memory."""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lsgd_ray.data.core import Dataset, DatasetFileError, DatasetNotFoundError

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
    """The image at ``path``, decoded (RGB); ``DatasetFileError`` naming it when it cannot be."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as exc:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetFileError(f"{path}: cannot be decoded as an image ({type(exc).__name__}: {first})") from None


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
