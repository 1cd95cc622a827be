"""Whole-batch augmentation for datasets held in memory as tensors (the fast path).

A worker keeps its shard as one tensor on its device and augments each batch with a few tensor
operations: no per-sample Python, no PIL, no DataLoader processes. ``scripts/bench_augment.py``
measures it against torchvision's per-sample transforms in a DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, size: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size``x``size`` crop at a random position of each image (zero-padded by ``padding``)."""
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    n, _, height, width = x.shape
    top = torch.randint(0, height - size + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, width - size + 1, (n,), generator=generator).to(x.device)
    span = torch.arange(size, device=x.device)
    rows = (top[:, None] + span)[:, None, :, None]  # n, 1, size, 1
    cols = (left[:, None] + span)[:, None, None, :]  # n, 1, 1, size
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[:, :, top : top + size, left : left + size]


@dataclass(frozen=True)
class Augment:
    """Training-time crop and flip of image batches; ``test`` is the matching test view.

    ``Augment(crop=28)`` is the LSGD reference's CIFAR-10 recipe (random 28x28 crop + flip,
    center crop 28 for testing); ``Augment(crop=32, padding=4)`` the usual pad-and-crop.
    """

    crop: int | None = None
    padding: int = 0
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop is not None:
            x = random_crop(x, self.crop, self.padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        return x

    def test(self, x: torch.Tensor) -> torch.Tensor:
        return center_crop(x, self.crop) if self.crop is not None and self.crop < x.shape[-1] else x

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.crop is None:
            return tuple(input_shape)
        return (input_shape[0], self.crop, self.crop)


AUGMENTS = {
    "none": None,
    "crop28-flip": Augment(crop=28),  # the reference's CIFAR-10 augmentation
    "pad4-crop-flip": Augment(crop=32, padding=4),
    "flip": Augment(),
}
