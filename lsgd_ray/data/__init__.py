"""Datasets as factories returning in-memory tensors, worker shards and the batch stream.

A dataset factory is any picklable callable returning a :class:`Dataset`; it runs inside each
worker (and in the driver, for the evaluator), so each node reads its own copy of the files. Named datasets:

- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 8x8 images): real and offline.
- ``synthetic``: seeded Gaussian class clusters, for tests and benchmarks; ``random_images``:
  MNIST-shaped noise for throughput runs.
- ``mnist``, ``fashion-mnist``: torchvision's readers of the idx files in ``data_dir``.
- ``cifar10``: the python batches in ``data_dir/cifar-10-batches-py``, with the reference's
  whole-batch crop-and-flip augmentation (``lsgd_ray.augment``).
- ``imagenet``: any torchvision ImageFolder tree (``data_dir/train/<class>/*``,
  ``data_dir/val/<class>/*``), streamed from disk: its splits are :class:`ImageFiles`, decoded a
  batch at a time, never held in memory.

The parts: ``core`` (``Dataset``, shards, batches), ``in_memory`` (digits, synthetic, MNIST-style,
CIFAR-10), ``streamed`` (ImageFolder trees); this module names them (``DATASETS``) and makes
their factories (``dataset_factory``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from lsgd_ray.augment import AUGMENTS
from lsgd_ray.data.core import (
    BatchStream,
    Dataset,
    DatasetFactory,
    DatasetFileError,
    DatasetNotFoundError,
    DealtStream,
    batch_stream,
    shard_indices,
    worker_seed,
)
from lsgd_ray.data.in_memory import (
    _MNIST_LIKE,
    CIFAR10_MEAN,
    CIFAR10_STD,
    _mnist_root,
    _require_cifar10,
    check_idx,
    cifar10,
    digits,
    mnist_like,
    random_images,
    read_cifar_batch,
    synthetic,
)
from lsgd_ray.data.streamed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    ImageTransform,
    _imagenet_help,
    _require_imagenet,
    decode_threads,
    imagenet,
    random_resized_crop_box,
    resident,
)


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
    from lsgd_ray.config_checks import ConfigError, check_choice

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


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchStream",
    "DealtStream",
    "batch_stream",
    "Dataset",
    "DatasetFactory",
    "DatasetFileError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageFiles",
    "ImageTransform",
    "check_idx",
    "cifar10",
    "dataset_factory",
    "dataset_spec",
    "decode_threads",
    "digits",
    "imagenet",
    "mnist_like",
    "random_images",
    "random_resized_crop_box",
    "read_cifar_batch",
    "resident",
    "shard_indices",
    "synthetic",
    "worker_seed",
]
