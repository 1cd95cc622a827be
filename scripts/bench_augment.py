"""The in-memory fast path against torchvision's per-sample DataLoader path.

    python scripts/bench_augment.py [--images 10000 --batches 100 --threads 1]

Both produce the reference's CIFAR-10 training batches (random 28x28 crop + horizontal flip,
normalised float tensors) from the same CIFAR-shaped uint8 images: torchvision applies
``RandomCrop``/``RandomHorizontalFlip``/``ToTensor``/``Normalize`` image by image in a
``DataLoader`` (``num_workers=0`` and 2); lsgd-ray keeps the normalised shard as one tensor
and augments whole batches (``lsgd_ray.augment``). Reported: samples/s for the data alone and
with a CNN7 training step on each batch, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from lsgd_ray.augment import AUGMENTS
from lsgd_ray.data import CIFAR10_MEAN, CIFAR10_STD
from lsgd_ray.models import cnn7


def torchvision_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int):
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(28),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )

    class Images(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i].transpose(1, 2, 0))), int(labels[i])

    loader = DataLoader(Images(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    while True:  # epoch after epoch
        yield from loader


def time_batches(batches, count: int, model=None) -> float:
    """Samples per second over ``count`` batches (after one warm-up batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
    iterator = iter(batches)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        x, y = next(iterator)
        if model is not None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        samples += len(y)
    return samples / (time.perf_counter() - start)


def fast_path(images: np.ndarray, labels: np.ndarray, batch: int):
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).float() / 255.0 - mean) / std  # once, at load time
    y = torch.from_numpy(labels)
    augment, rng = AUGMENTS["crop28-flip"], torch.Generator().manual_seed(0)
    while True:
        index = torch.randint(0, len(y), (batch,), generator=rng)
        yield augment(x[index], rng), y[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses one per CPU)")
    parser.add_argument("--output", default="runs/bench_augment.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)
    rows = {}
    for label, make in (
        ("torchvision DataLoader, num_workers=0", lambda: torchvision_loader(images, labels, args.batch_size, 0)),
        ("torchvision DataLoader, num_workers=2", lambda: torchvision_loader(images, labels, args.batch_size, 2)),
        ("lsgd-ray whole-batch (in memory)", lambda: fast_path(images, labels, args.batch_size)),
    ):
        torch.manual_seed(0)
        data_only = time_batches(make(), args.batches)
        with_step = time_batches(make(), args.batches, cnn7((3, 28, 28), 10))
        rows[label] = {"data_samples_per_s": data_only, "with_cnn7_step_samples_per_s": with_step}
        print(f"{label:<40} data {data_only:>10,.0f}/s   with a CNN7 step {with_step:>8,.0f}/s", flush=True)
    fast = rows["lsgd-ray whole-batch (in memory)"]
    for label, row in rows.items():
        if "lsgd-ray" not in label:
            print(
                f"speed-up over {label}: data x{fast['data_samples_per_s'] / row['data_samples_per_s']:.1f}, "
                f"with a CNN7 step x{fast['with_cnn7_step_samples_per_s'] / row['with_cnn7_step_samples_per_s']:.2f}"
            )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
