"""Model factories by name. A model factory is any picklable zero-argument callable returning an
``nn.Module``; these build models for a dataset's input shape and class count.

- ``mlp``, ``cnn``: small models for MNIST-sized inputs (and the tests).
- ``cnn7``: the EASGD paper's 7-layer CNN exactly as the LSGD reference code defines it.
- ``resnet20``: the CIFAR ResNet (He et al. 2016, 3 stages x 3 basic blocks, option-A shortcuts).
- ``vgg16``: VGG configuration D with BatchNorm, CIFAR classifier 512→512→10 with dropout.
- ``resnet50``: torchvision's ResNet-50 (ImageNet), randomly initialised.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ModelFactory = Callable[[], nn.Module]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Two hidden ReLU layers over the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Two conv-BatchNorm-ReLU blocks for small images (8x8 digits up to 32x32)."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )


def cnn7(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """conv5 C→64, ReLU, pool → conv5 64→128, ReLU, pool → conv3 128→64, ReLU → flatten →
    linear →256 → dropout 0.5 → linear 256→classes. On the reference's 28x28 crops the flattened
    size is 64·2·2 = 256; other input sizes get the matching first linear layer. As in the
    reference there is no nonlinearity between the two linear layers."""
    channels, height, width = input_shape
    features = nn.Sequential(
        nn.Conv2d(channels, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
    )
    if min(height, width) < 24:
        raise ValueError(f"cnn7 needs inputs of at least 24x24 pixels, got {height}x{width}")
    side = lambda n: ((n - 4) // 2 - 4) // 2 - 2  # noqa: E731  (conv5, pool, conv5, pool, conv3)
    flat = 64 * side(height) * side(width)
    return nn.Sequential(features, nn.Linear(flat, 256), nn.Dropout(0.5), nn.Linear(256, num_classes))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; option-A shortcut (stride-2 subsampling, zero-padded channels)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.pad = outputs - inputs if stride != 1 or inputs != outputs else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    def __init__(self, channels: int, num_classes: int, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, inputs = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks_per_stage):
                layers.append(_BasicBlock(inputs, outputs, stride if b == 0 else 1))
                inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-20 for 32x32 (or 28x28) images: 0.27 M parameters."""
    return ResNetCifar(input_shape[0], num_classes, blocks_per_stage=3)


VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-16 (configuration D) with BatchNorm for CIFAR-sized images. Pools round up, so 28x28
    crops end at 1x1 like 32x32 images do."""
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    classifier = [nn.Flatten(), nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5)]
    return nn.Sequential(*layers, *classifier, nn.Linear(512, num_classes))


def resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-50, randomly initialised (no download)."""
    from torchvision.models import resnet50 as torchvision_resnet50

    if input_shape[0] != 3:
        raise ValueError(f"resnet50 expects 3-channel images, got {input_shape[0]} channels")
    return torchvision_resnet50(weights=None, num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": small_cnn,
    "cnn7": cnn7,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "resnet50": resnet50,
}
IMAGE_MODELS = ("cnn", "cnn7", "resnet20", "vgg16", "resnet50")


def model_factory(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelFactory:
    """A picklable factory for a named model (see ``MODELS``)."""
    from lsgd_ray.config_checks import ConfigError, check_choice

    check_choice("model", name, sorted(MODELS))
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs image inputs (C, H, W), the dataset gives {input_shape}; use 'mlp'")
    factory = functools.partial(MODELS[name], tuple(input_shape), num_classes)
    try:
        factory()  # build once here, so a model that cannot fit the input fails before any actor
    except ValueError as exc:
        raise ConfigError(f"model {name!r} for inputs {tuple(input_shape)}: {exc}") from None
    return factory
