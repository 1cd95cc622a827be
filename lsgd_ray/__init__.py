"""lsgd-ray: Leader SGD and its peers on Ray actors.

from lsgd_ray import TrainConfig, LSGDConfig, fit, dataset_factory, model_factory
"""

from lsgd_ray.config import ConfigError, LSGDConfig, OptimizerConfig, TrainConfig
from lsgd_ray.data import DATASETS, Dataset, DatasetNotFoundError, dataset_factory
from lsgd_ray.models import MODELS, model_factory
from lsgd_ray.results import FitResult
from lsgd_ray.topology import PlacementError
from lsgd_ray.trainer import Trainer, fit

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "MODELS",
    "ConfigError",
    "Dataset",
    "DatasetNotFoundError",
    "FitResult",
    "LSGDConfig",
    "OptimizerConfig",
    "PlacementError",
    "TrainConfig",
    "Trainer",
    "dataset_factory",
    "fit",
    "model_factory",
]
