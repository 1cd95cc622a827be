"""lsgd-ray: Leader SGD and its peers on Ray actors.

    from lsgd_ray import TrainConfig, LSGDConfig, fit, dataset_factory, model_factory

Names are imported on first use, so processes that need only the configs or the update rules
(the GlobalLeader, for one) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "lsgd_ray.config",
    "LSGDConfig": "lsgd_ray.config",
    "EASGDConfig": "lsgd_ray.config",
    "DownpourConfig": "lsgd_ray.config",
    "LocalSGDConfig": "lsgd_ray.config",
    "GossipConfig": "lsgd_ray.config",
    "DiLoCoConfig": "lsgd_ray.config",
    "DataParallelConfig": "lsgd_ray.config",
    "ALGORITHMS": "lsgd_ray.algorithms",
    "OptimizerConfig": "lsgd_ray.config",
    "TrainConfig": "lsgd_ray.config",
    "preset_config": "lsgd_ray.presets",
    "DATASETS": "lsgd_ray.data",
    "Dataset": "lsgd_ray.data",
    "DatasetNotFoundError": "lsgd_ray.data",
    "dataset_factory": "lsgd_ray.data",
    "MODELS": "lsgd_ray.models",
    "model_factory": "lsgd_ray.models",
    "FitResult": "lsgd_ray.results",
    "PlacementError": "lsgd_ray.topology",
    "Trainer": "lsgd_ray.trainer",
    "fit": "lsgd_ray.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lsgd_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *__all__]


if TYPE_CHECKING:
    from lsgd_ray.algorithms import ALGORITHMS  # noqa: F401
    from lsgd_ray.config import *  # noqa: F403  (the configs and ConfigError: config's __all__)
    from lsgd_ray.data import DATASETS, Dataset, DatasetNotFoundError, dataset_factory  # noqa: F401
    from lsgd_ray.models import MODELS, model_factory  # noqa: F401
    from lsgd_ray.presets import preset_config  # noqa: F401
    from lsgd_ray.results import FitResult  # noqa: F401
    from lsgd_ray.topology import PlacementError  # noqa: F401
    from lsgd_ray.trainer import Trainer, fit  # noqa: F401
