"""Frozen, self-validating configuration dataclasses.

Every check runs in ``__post_init__`` so a bad value is refused where it is written, long
before any Ray actor starts, with a message that says what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MODES = ("sync", "async")
LEADER_ESTIMATES = ("train_loss", "val_batch")
EVALUATED_MODELS = ("leader", "center")  # LSGD: which model test_accuracy, the progress line and a target use
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
DOWNPOUR_RULES = ("mean", "sum")  # how the server applies a push: scaled by 1/W, or added whole


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Refuse an unknown name, listing the valid ones."""
    _check(value in valid, f"unknown {kind} {value!r}; choose one of: {', '.join(valid)}")


def _got(value: Any) -> str:
    """``value`` for a message, with its type when the type is what is wrong (a str, a bool...)."""
    return repr(value) if _is_number(value) else f"{value!r} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    """An int or a float. Not a bool: Python counts True as 1, but nobody means a number by it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(name: str, value: float) -> None:
    _check(
        _is_number(value) and 0.0 <= value <= 1.0,
        f"{name} must be in [0, 1] (it is the fraction of the distance to the leader "
        f"covered by one pull), got {_got(value)}",
    )


def _check_positive_int(name: str, value: Any) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {_got(value)}",
    )


def _check_number(name: str, value: Any, op: str = ">", bound: float = 0.0, what: str = "") -> None:
    """A finite number ``> bound`` (``op=">="``: or equal to it); ``what`` adds e.g. " of seconds"."""
    above = _is_number(value) and math.isfinite(value) and (value > bound if op == ">" else value >= bound)
    _check(above, f"{name} must be {op} {bound:g} (a finite number{what}), got {_got(value)}")


def _check_optional_path(name: str, value: Any) -> None:
    _check(
        value is None or (isinstance(value, (str, os.PathLike)) and str(value) != ""),
        f"{name} must be a non-empty path (a str) or None, got {_got(value)}",
    )


def _check_bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), f"{name} must be True or False, got {_got(value)}")


@dataclass(frozen=True)
class LSGDConfig:
    """Leader SGD: every ``tau`` steps pull toward the group's leader with strength ``lam``,
    every ``tau_global`` steps toward the global leader with ``lam_global``.

    In ``async`` mode the periods count steps summed over workers (Algorithm 1 of the paper):
    a local pull happens each time the group's workers together take ``l * tau`` steps, a
    global pull each time all workers together take ``n * l * tau_global`` steps.
    """

    lam: float = 0.1
    lam_global: float = 0.1
    tau: int = 4
    tau_global: int = 16
    mode: Literal["sync", "async"] = "sync"
    leader_estimate: Literal["train_loss", "val_batch"] = "train_loss"
    loss_window: int = 10
    val_batch_size: int = 256
    # The reference's later version: after every local step, a small pull toward the last known
    # local and global leaders with strength proximal/τ and proximal/τ_G. 0 turns it off.
    proximal: float = 0.0
    # Every evaluation scores both the leader and the center (the mean of all workers, what the
    # reference code reports); this picks the one behind test_accuracy, the progress line,
    # target_accuracy and the final summary.
    evaluate: Literal["leader", "center"] = "leader"

    def __post_init__(self) -> None:
        _check_fraction("lam (local pulling strength λ)", self.lam)
        _check_fraction("lam_global (global pulling strength λ_G)", self.lam_global)
        _check_positive_int("tau (local communication period τ, in steps)", self.tau)
        _check_positive_int("tau_global (global communication period τ_G)", self.tau_global)
        check_choice("mode", self.mode, MODES)
        check_choice("leader_estimate", self.leader_estimate, LEADER_ESTIMATES)
        _check_positive_int("loss_window (batches averaged for the leader estimate)", self.loss_window)
        _check_positive_int("val_batch_size", self.val_batch_size)
        _check_fraction("proximal (per-period strength of the per-step pull toward the last leaders)", self.proximal)
        _check(
            isinstance(self.evaluate, str) and self.evaluate in EVALUATED_MODELS,
            f"evaluate (the model behind test_accuracy, the progress line and target_accuracy; both are "
            f"recorded) must be one of: {', '.join(EVALUATED_MODELS)}, got {_got(self.evaluate)}",
        )


@dataclass(frozen=True)
class EASGDConfig:
    """Elastic averaging: every ``tau`` steps each worker and the center pull toward each other
    with moving rate α = ``beta``/p (or ``alpha`` when given). ``async``: each worker exchanges
    with the center on its own schedule."""

    beta: float = 0.9
    alpha: float | None = None
    tau: int = 4
    mode: Literal["sync", "async"] = "sync"

    def __post_init__(self) -> None:
        _check(
            _is_number(self.beta) and 0.0 <= self.beta <= 1.0,
            f"beta (EASGD's total elastic rate, α = β/p) must be in [0, 1], got {_got(self.beta)}",
        )
        if self.alpha is not None:
            _check_fraction("alpha (EASGD moving rate)", self.alpha)
        _check_positive_int("tau (EASGD communication period, in steps)", self.tau)
        check_choice("mode", self.mode, MODES)

    def moving_rate(self, num_workers: int) -> float:
        return self.alpha if self.alpha is not None else self.beta / num_workers


@dataclass(frozen=True)
class DownpourConfig:
    """Asynchronous parameter server: push the accumulated update every ``n_push`` steps, fetch
    the server's weights every ``n_fetch`` steps. Always asynchronous.

    ``rule`` is how the server applies a push ``v`` from one of its W workers: ``"mean"`` (the
    default) adds ``v / W``, so that one push from every worker moves the server as far as one
    worker's average change; ``"sum"`` adds ``v`` whole, as Dean et al. (2012) and the EASGD
    paper's Algorithm 3 write it. Under "sum" the server moves W times as far as any worker, on
    top of each worker's momentum: with the defaults (Nesterov 0.9, lr 0.05, 4 workers) it
    collapsed to chance on the bundled digits. Dean et al. tamed it with Adagrad on the server;
    the EASGD paper tuned a smaller learning rate for each worker count and kept τ = 1. With one
    worker both rules are the same plain loop."""

    n_push: int = 4
    n_fetch: int = 4
    rule: str = "mean"

    def __post_init__(self) -> None:
        check_choice("DOWNPOUR rule", self.rule, DOWNPOUR_RULES)
        _check_positive_int("n_push (DOWNPOUR push period, in steps)", self.n_push)
        _check_positive_int("n_fetch (DOWNPOUR fetch period, in steps)", self.n_fetch)


@dataclass(frozen=True)
class LocalSGDConfig:
    """Hierarchical model averaging: average within each group every ``tau`` steps and over all
    workers every ``tau_global`` steps (torch's HierarchicalModelAverager)."""

    tau: int = 4
    tau_global: int = 16

    def __post_init__(self) -> None:
        _check_positive_int("tau (local averaging period, in steps)", self.tau)
        _check_positive_int("tau_global (global averaging period, in steps)", self.tau_global)


@dataclass(frozen=True)
class GossipConfig:
    """D-PSGD / AL-DSGD: every ``tau`` steps each worker mixes with its neighbours on ``graph``
    (``degree`` for random_regular). ``rotation="matchings"`` activates one matching of the base
    graph per round (dynamic graphs), ``"none"`` the whole graph. AL-DSGD adds the corrective
    pulls c1, c2 (mix) and p1, p2 (pull) toward the best and the max-degree neighbour; D-PSGD
    ignores them. Defaults are the AL-DSGD reference's."""

    graph: str = "ring"
    degree: int = 3
    rotation: str = "matchings"
    tau: int = 1
    c1: float = 0.3
    c2: float = 0.1
    p1: float = 0.2
    p2: float = 0.2
    graph_seed: int = 0

    def __post_init__(self) -> None:
        from lsgd_ray.algorithms.gossip import GRAPHS, ROTATIONS

        check_choice("graph", self.graph, GRAPHS)
        check_choice("rotation", self.rotation, ROTATIONS)
        _check_positive_int("degree (of the random regular graph)", self.degree)
        _check_positive_int("tau (gossip period, in steps)", self.tau)
        for name in ("c1", "c2", "p1", "p2"):
            _check_fraction(f"{name} (AL-DSGD corrective coefficient)", getattr(self, name))
        _check(
            self.c1 + self.c2 <= 1.0,
            f"c1 + c2 must be <= 1 (the mix keeps 1 - c1 - c2 of a worker's own weights), "
            f"got {self.c1:g} + {self.c2:g} = {self.c1 + self.c2:g}",
        )
        _check(
            self.p1 + self.p2 <= 1.0,
            f"p1 + p2 must be <= 1 (the pull keeps 1 - p1 - p2 of a worker's own weights), "
            f"got {self.p1:g} + {self.p2:g} = {self.p1 + self.p2:g}",
        )
        _check(
            isinstance(self.graph_seed, int) and not isinstance(self.graph_seed, bool),
            f"graph_seed (of the random regular graph) must be an integer, got {_got(self.graph_seed)}",
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """The workers' local optimizer; defaults are the reference code's (Nesterov SGD)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        check_choice("optimizer", self.name, OPTIMIZERS)
        _check(
            _is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0,
            f"lr must be a positive number (finite, > 0), got {_got(self.lr)}",
        )
        _check(
            _is_number(self.momentum) and 0.0 <= self.momentum < 1.0,
            f"momentum must be in [0, 1), got {_got(self.momentum)}",
        )
        _check_bool("nesterov", self.nesterov)
        _check(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            "nesterov=True needs momentum > 0 (torch.optim.SGD refuses it); set nesterov=False or give a momentum",
        )
        _check_number("weight_decay", self.weight_decay, ">=", 0)


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
