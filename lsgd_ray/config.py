"""Frozen, self-validating configuration dataclasses.

Every check runs in ``__post_init__`` so a bad value is refused where it is written, long
before any Ray actor starts, with a message that says what to change. ``TrainConfig`` is here;
the settings of each algorithm and of the optimizer are in ``lsgd_ray.settings`` (re-exported
here), the shared checks and the choices they allow in ``lsgd_ray.config_checks``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from lsgd_ray.config_checks import (
    COMM_DTYPES,
    ConfigError,
    _check,
    _check_bool,
    _check_number,
    _check_optional_path,
    _check_positive_int,
    _got,
    _is_number,
    check_choice,
)
from lsgd_ray.settings import (
    DataParallelConfig,
    DiLoCoConfig,
    DownpourConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
)

__all__ = [
    "ConfigError",
    "DataParallelConfig",
    "DiLoCoConfig",
    "DownpourConfig",
    "EASGDConfig",
    "GossipConfig",
    "LSGDConfig",
    "LocalSGDConfig",
    "OptimizerConfig",
    "TrainConfig",
]


@dataclass(frozen=True)
class TrainConfig:
    """Everything about one run except the model and the data.

    Topology: by default one group per Ray node with one worker per GPU (``gpus_per_worker > 0``)
    or per ``cpus_per_worker`` CPUs. ``num_groups`` / ``workers_per_group`` override it (for
    example 4 groups x 4 workers on one machine).

    Budget: ``epochs`` (passes over each worker's shard), ``max_steps`` (steps per worker) and
    ``time_budget_s`` (training wall-clock seconds, evaluation excluded); the run ends at the
    first one reached. At least one must be set. ``target_accuracy`` also ends the run, at the
    first evaluation whose test accuracy reaches it (for time-to-accuracy measurements).
    """

    algorithm: str = "lsgd"
    lsgd: LSGDConfig = field(default_factory=LSGDConfig)
    easgd: EASGDConfig = field(default_factory=EASGDConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    local_sgd: LocalSGDConfig = field(default_factory=LocalSGDConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)  # dpsgd and aldsgd
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    num_groups: int | None = None
    workers_per_group: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 128
    # False: each worker keeps one fixed 1/W of the training set for the whole run. True: the
    # shares are re-dealt every epoch (a permutation seeded with seed + epoch, dealt by rank), as
    # torch's DistributedSampler with set_epoch does and the reference code runs; each worker
    # then holds the whole training split. One worker is a plain loop over the shuffled data.
    redeal_shards: bool = False
    # How weights travel between workers: "float32", or "bfloat16" for half the bytes (LSGD's
    # leaders, EASGD's center, local SGD's averages, DiLoCo's pseudo-gradients; the algorithms
    # that take it are in the registry's comm_dtypes; docs/algorithms.md says what travels).
    comm_dtype: str = "float32"
    epochs: float | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None
    eval_every_s: float = 5.0
    target_accuracy: float | None = None
    eval_batch_size: int = 1024
    seed: int = 0
    output_dir: str | None = None
    address: str | None = None
    actor_timeout_s: float = 120.0
    # Extra seconds of sleep per step for chosen global worker ranks: simulates a
    # heterogeneous cluster (stragglers), e.g. {0: 0.05}.
    straggler_delay_s: dict[int, float] = field(default_factory=dict)
    quiet: bool = False  # no progress lines; the closing summary still prints
    # Checkpoints (in ``output_dir/checkpoints``): every ``checkpoint_every_steps`` steps per
    # worker and/or every ``checkpoint_every_s`` training seconds; the last ``keep_checkpoints``
    # are kept. ``resume`` is a run's output directory (or one checkpoint directory) to continue.
    checkpoint_every_steps: int | None = None
    checkpoint_every_s: float | None = None
    keep_checkpoints: int = 3
    resume: str | None = None
    # A run whose evaluated model turns non-finite or falls back to chance is always reported
    # (status "diverged"); with this it also stops at that evaluation.
    stop_on_divergence: bool = False

    def __post_init__(self) -> None:
        from lsgd_ray.algorithms import ALGORITHMS

        check_choice("algorithm", self.algorithm, sorted(ALGORITHMS))
        for name, kind in (
            ("lsgd", LSGDConfig),
            ("easgd", EASGDConfig),
            ("downpour", DownpourConfig),
            ("local_sgd", LocalSGDConfig),
            ("gossip", GossipConfig),
            ("diloco", DiLoCoConfig),
            ("data_parallel", DataParallelConfig),
        ):
            value = getattr(self, name)
            _check(isinstance(value, kind), f"{name} must be a {kind.__name__}(...), got {_got(value)}")
        _check(
            isinstance(self.optimizer, OptimizerConfig),
            f"optimizer must be an OptimizerConfig(...), got {_got(self.optimizer)}",
        )
        for name in ("num_groups", "workers_per_group", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(name, value)
        _check_number("cpus_per_worker", self.cpus_per_worker, what=" of Ray CPUs per worker")
        _check_number("gpus_per_worker", self.gpus_per_worker, ">=", 0, " of GPUs per worker; 0.5 shares one")
        _check_positive_int("batch_size", self.batch_size)
        _check_bool("redeal_shards", self.redeal_shards)
        check_choice("comm_dtype", self.comm_dtype, COMM_DTYPES)
        takes = ALGORITHMS[self.algorithm].comm_dtypes
        _check(
            self.comm_dtype in takes,
            f"comm_dtype {self.comm_dtype!r} is not implemented for {self.algorithm} (it takes: {', '.join(takes)})",
        )
        _check_positive_int("eval_batch_size", self.eval_batch_size)
        _check(
            self.epochs is not None or self.max_steps is not None or self.time_budget_s is not None,
            "set a budget: epochs, max_steps or time_budget_s (any combination; the first reached ends the run)",
        )
        if self.epochs is not None:
            _check_number("epochs", self.epochs, what=" of passes over each shard; None for no limit")
        if self.time_budget_s is not None:
            _check_number("time_budget_s", self.time_budget_s, what=" of seconds; None for no limit")
        _check_number("eval_every_s", self.eval_every_s, what=" of seconds")
        if self.target_accuracy is not None:
            _check(
                _is_number(self.target_accuracy) and 0 < self.target_accuracy <= 1,
                f"target_accuracy must be a test accuracy in (0, 1] (e.g. 0.88), or None to train to the "
                f"budget, got {_got(self.target_accuracy)}",
            )
        _check_number("actor_timeout_s", self.actor_timeout_s, what=" of seconds")
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {_got(self.seed)}",
        )
        _check_optional_path("output_dir", self.output_dir)
        _check(
            self.address is None or (isinstance(self.address, str) and self.address != ""),
            f"address must be a Ray cluster address such as 'auto' or '10.0.0.1:6379', or None for an "
            f"embedded Ray, got {_got(self.address)}",
        )
        _check_bool("quiet", self.quiet)
        _check_bool("stop_on_divergence", self.stop_on_divergence)
        _check_optional_path("resume", self.resume)
        if self.checkpoint_every_steps is not None:
            _check_positive_int("checkpoint_every_steps", self.checkpoint_every_steps)
        if self.checkpoint_every_s is not None:
            _check_number("checkpoint_every_s", self.checkpoint_every_s, what=" of seconds; None for none")
        _check_positive_int("keep_checkpoints", self.keep_checkpoints)
        _check(
            isinstance(self.straggler_delay_s, dict),
            f"straggler_delay_s maps worker rank -> seconds >= 0, e.g. {{0: 0.05}}, got {_got(self.straggler_delay_s)}",
        )
        for rank, delay in self.straggler_delay_s.items():
            _check(
                isinstance(rank, int)
                and not isinstance(rank, bool)
                and rank >= 0
                and _is_number(delay)
                and math.isfinite(delay)
                and delay >= 0,
                f"straggler_delay_s maps worker rank -> seconds >= 0, got {_got(rank)}: {_got(delay)}",
            )

    @property
    def mode(self) -> str:
        """``sync`` (rounds driven by the coordinator) or ``async`` (workers at their own speed)."""
        from lsgd_ray.algorithms import ALGORITHMS

        return ALGORITHMS[self.algorithm].mode(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["straggler_delay_s"] = {str(k): v for k, v in self.straggler_delay_s.items()}
        return data


def nested_config_classes() -> dict[str, type]:
    """``TrainConfig``'s nested config fields and their classes (``lsgd``: ``LSGDConfig``,
    ``gossip``: ``GossipConfig``, ``optimizer``: ``OptimizerConfig``, ...)."""
    classes: dict[str, type] = {}
    for f in fields(TrainConfig):
        factory = f.default_factory
        if isinstance(factory, type) and is_dataclass(factory):
            classes[f.name] = factory
    return classes
