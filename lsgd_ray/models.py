"""Model factories by name. A model factory is any picklable zero-argument callable returning an
``nn.Module``; these build small models for a dataset's input shape and class count."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

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


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": small_cnn}


def model_factory(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelFactory:
    """A picklable factory for a named model (see ``MODELS``)."""
    from lsgd_ray.config import ConfigError, check_choice

    check_choice("model", name, sorted(MODELS))
    if name == "cnn" and len(input_shape) != 3:
        raise ConfigError(f"model 'cnn' needs image inputs (C, H, W), the dataset gives {input_shape}; use 'mlp'")
    return functools.partial(MODELS[name], tuple(input_shape), num_classes)
