"""The settings of each algorithm and of the optimizers: frozen dataclasses that check
themselves (``TrainConfig`` in ``lsgd_ray.config`` holds one of each)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lsgd_ray.config_checks import (
    DOWNPOUR_RULES,
    EVALUATED_MODELS,
    GRADIENT_COMPRESSIONS,
    LEADER_ESTIMATES,
    MODES,
    OPTIMIZERS,
    _check,
    _check_bool,
    _check_fraction,
    _check_number,
    _check_positive_int,
    _got,
    _is_number,
    check_choice,
)


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


def _outer_default() -> OptimizerConfig:
    return OptimizerConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True, weight_decay=0.0)


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo: every ``tau_global`` (H) inner steps the pseudo-gradient (global weights minus
    local weights) is averaged over all workers and the ``outer`` optimizer steps the global
    weights on it (default: SGD lr 0.7, momentum 0.9, Nesterov, as in the paper).

    ``tau``: hierarchical DiLoCo, the workers of a group (one node) also average their weights
    every ``tau`` steps between outer steps, so only the outer step crosses nodes (None: flat).
    ``fragments``: Streaming DiLoCo, the weights in F fragments synchronised round-robin, one
    every H/F steps (each every H)."""

    tau_global: int = 16
    tau: int | None = None
    fragments: int = 1
    outer: OptimizerConfig = field(default_factory=_outer_default)

    def __post_init__(self) -> None:
        _check_positive_int("tau_global (DiLoCo's outer period H, in inner steps)", self.tau_global)
        _check_positive_int("fragments (Streaming DiLoCo's fragments; 1 = plain DiLoCo)", self.fragments)
        _check(
            self.tau_global % self.fragments == 0,
            f"fragments must divide tau_global (one fragment is synchronised every H/F steps), got "
            f"H = {self.tau_global}, F = {self.fragments}",
        )
        if self.tau is not None:
            _check_positive_int("tau (hierarchical DiLoCo's group averaging period; None = flat)", self.tau)
            _check(
                self.fragments == 1,
                "hierarchical DiLoCo (tau set) streams no fragments here: set fragments=1 or tau=None",
            )
            _check(
                self.tau < self.tau_global,
                f"tau (group averaging) must be shorter than tau_global (the outer step), got "
                f"tau = {self.tau}, tau_global = {self.tau_global}",
            )
        _check(
            isinstance(self.outer, OptimizerConfig),
            f"outer must be an OptimizerConfig(...) (the outer optimizer), got {_got(self.outer)}",
        )


@dataclass(frozen=True)
class DataParallelConfig:
    """Data-parallel SGD's gradient all-reduce, compressed or not. ``compression``: ``"none"``;
    ``"powersgd"``, torch's ``powerSGD_hook`` (rank ``powersgd_rank``, a plain all-reduce for
    the first ``powersgd_start`` steps, ``error_feedback``, ``warm_start``); ``"bf16"``, torch's
    ``bf16_compress_hook``. The hooks run on the workers' flat gradient
    (``lsgd_ray/comm_hooks.py``)."""

    compression: str = "none"
    powersgd_rank: int = 2
    powersgd_start: int = 10
    error_feedback: bool = True
    warm_start: bool = True

    def __post_init__(self) -> None:
        check_choice("compression", self.compression, GRADIENT_COMPRESSIONS)
        _check_positive_int("powersgd_rank (PowerSGD's matrix approximation rank)", self.powersgd_rank)
        _check(
            isinstance(self.powersgd_start, int)
            and not isinstance(self.powersgd_start, bool)
            and self.powersgd_start >= 0,
            f"powersgd_start (steps of plain all-reduce before PowerSGD) must be an integer >= 0, got "
            f"{_got(self.powersgd_start)}",
        )
        _check_bool("error_feedback", self.error_feedback)
        _check_bool("warm_start", self.warm_start)
        _check(
            not ((self.error_feedback or self.warm_start) and self.powersgd_start <= 1),
            f"powersgd_start must be > 1 with error_feedback or warm_start (torch's PowerSGD needs two plain "
            f"steps first), got {self.powersgd_start}",
        )
