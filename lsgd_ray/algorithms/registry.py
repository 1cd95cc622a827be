"""Every algorithm in one table: one row says what a run needs to know about it.

Adding an algorithm is a row here, a rules module (pure functions over flat tensors, in this
package), its settings dataclass in ``lsgd_ray.config`` (when it has settings) and, if none of
the coordinators fits its communication pattern, a coordinator in ``lsgd_ray._internal``.
The config's ``algorithm`` choices, the CLI's ``--algorithm`` choices and each algorithm's own
flags (and the settings they make), the coordinator the Trainer starts, the start-up line, the
asynchronous report period and the byte theory the tests and ``scripts/bench_comm.py`` check all
come from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lsgd_ray.algorithms import data_parallel, diloco, downpour, easgd, gossip, local_sgd, lsgd
from lsgd_ray.config_checks import DOWNPOUR_RULES, EVALUATED_MODELS, GRADIENT_COMPRESSIONS, LEADER_ESTIMATES, OPTIMIZERS
from lsgd_ray.settings import DiLoCoConfig, OptimizerConfig
from lsgd_ray.wire import WIRE_SIZE

if TYPE_CHECKING:
    from lsgd_ray._internal.coordinator import Coordinator
    from lsgd_ray.config import TrainConfig

Bytes = dict[str, float]

# ``lsgd-ray train`` flags several algorithms share (lsgd_ray.cli_train); each reaches the
# settings of the algorithm run where they have a field of its name, and is left to their
# default when not given
SHARED_FLAGS = ("tau", "tau_global", "mode")


@dataclass(frozen=True)
class Flag:
    """One ``lsgd-ray train`` flag of an algorithm's own: ``--dest`` (dashes for underscores)
    sets ``field`` of its settings; ``options`` go to argparse (the default: the field's)."""

    dest: str
    field: str
    options: dict[str, Any]


def flag(dest: str, field: str | None = None, **options: Any) -> Flag:
    return Flag(dest, field or dest, options)


@dataclass(frozen=True)
class Algorithm:
    name: str
    rules: ModuleType  # its update rules
    settings: str | None  # the TrainConfig field holding its settings; None: it has none
    coordinator: str  # "module:Class": the actor that plays the GlobalLeader's role (imported at start)
    describe: Callable[[Any], str]  # its settings in brief, for the start-up line
    # bytes per worker-step in theory: (settings, weight bytes S, group sizes) -> sent, received
    theory: Callable[[Any, int, Sequence[int]], Bytes]
    # asynchronous mode: how often (in its own steps) a worker reports its progress
    report_every: Callable[[Any], int] | None = None
    fixed_mode: str | None = None  # its only mode; None: the settings' ``mode`` field says
    needs_graph: bool = False  # a communication graph over the workers, checked at start
    comm_dtypes: tuple[str, ...] = ("float32",)  # how its weights may travel (TrainConfig.comm_dtype)
    flags: tuple[Flag, ...] = ()  # its own ``lsgd-ray train`` flags (rows sharing settings share them)
    # its settings from its flags' values (by field); None: the settings class called with them
    build: Callable[..., Any] | None = field(default=None, repr=False)

    def settings_of(self, config: TrainConfig) -> Any:
        return getattr(config, self.settings) if self.settings else None

    def mode(self, config: TrainConfig) -> str:
        """``sync`` (rounds driven by the coordinator) or ``async`` (workers at their own speed)."""
        return self.fixed_mode or self.settings_of(config).mode

    def summary(self, config: TrainConfig) -> str:
        return self.describe(self.settings_of(config))

    def expected_bytes(self, config: TrainConfig, weight_bytes: int, group_sizes: Sequence[int]) -> Bytes:
        """``weight_bytes``: S in float32; what travels is S x (comm_dtype's size / 4)."""
        wire = weight_bytes * WIRE_SIZE[config.comm_dtype] // 4
        return self.theory(self.settings_of(config), wire, group_sizes)

    def async_report_period(self, config: TrainConfig) -> int:
        if self.report_every is None:
            raise ValueError(f"{self.name} has no asynchronous mode")
        return self.report_every(self.settings_of(config))

    def coordinator_class(self) -> type[Coordinator]:
        module, name = self.coordinator.split(":")
        return getattr(importlib.import_module(module), name)

    def settings_type(self) -> type | None:
        """The class of its settings (``TrainConfig``'s field ``settings`` holds one)."""
        from lsgd_ray.config import nested_config_classes

        return nested_config_classes()[self.settings] if self.settings else None

    def add_flags(self, parser: argparse._ActionsContainer) -> None:
        """Its own flags, on ``parser`` (an argument group); the defaults are its settings'."""
        kind = self.settings_type()
        defaults = {f.name: f.default for f in dataclasses.fields(kind)} if kind else {}
        for f in self.flags:
            options = {"default": defaults.get(f.field), **f.options}
            parser.add_argument("--" + f.dest.replace("_", "-"), dest=f.dest, **options)

    def settings_from_flags(self, args: argparse.Namespace, shared: bool = True) -> Any:
        """Its settings from ``lsgd-ray train``'s parsed flags: its own and (``shared``) the
        shared ones it has a field for; None if it has no settings."""
        kind = self.settings_type()
        if kind is None:
            return None
        names = {f.name for f in dataclasses.fields(kind)} if shared else set()
        values = {n: getattr(args, n) for n in SHARED_FLAGS if n in names and getattr(args, n) is not None}
        values.update({f.field: getattr(args, f.dest) for f in self.flags})
        return (self.build or kind)(**values)


_OUTER = DiLoCoConfig().outer  # the outer optimizer's defaults


def _diloco_settings(outer_name: str, outer_lr: float, outer_momentum: float, **values: Any) -> DiLoCoConfig:
    outer = OptimizerConfig(
        name=outer_name,
        lr=outer_lr,
        momentum=outer_momentum,
        nesterov=outer_name == "sgd" and outer_momentum > 0,
        weight_decay=0.0,
    )
    return DiLoCoConfig(**values, outer=outer)


_GOSSIP_FLAGS = (
    flag("graph", choices=gossip.GRAPHS, help="the base communication graph"),
    flag("degree", type=int, help="the degree of the random_regular graph"),
    flag("rotation", choices=gossip.ROTATIONS, help="one matching per round, or none"),
    *(flag(n, type=float, help=f"aldsgd: corrective coefficient {n}") for n in ("c1", "c2", "p1", "p2")),
)


def _gossip(name: str, corrective: bool) -> Algorithm:
    def describe(g: Any) -> str:
        extra = f" c1={g.c1} c2={g.c2} p1={g.p1} p2={g.p2}" if corrective else ""
        return f"graph={g.graph} rotation={g.rotation} tau={g.tau}{extra}"

    return Algorithm(
        name,
        gossip,
        "gossip",
        "lsgd_ray._internal.peer_gossip:Gossip",
        describe,
        lambda g, S, sizes: gossip.expected_bytes(S, sum(sizes), g.graph, g.degree, g.graph_seed, g.rotation, g.tau),
        fixed_mode="sync",
        needs_graph=True,
        flags=_GOSSIP_FLAGS,
    )


_ROWS = [
    Algorithm(
        "lsgd",
        lsgd,
        "lsgd",
        "lsgd_ray._internal.global_leader:GlobalLeader",
        lambda c: f"tau={c.tau} tau_G={c.tau_global} lam={c.lam} lam_G={c.lam_global}",
        lambda c, S, sizes: lsgd.expected_bytes(S, sizes, c.tau, c.tau_global),
        report_every=lambda c: max(1, min(c.tau, c.tau_global)),
        comm_dtypes=("float32", "bfloat16"),
        flags=(
            flag("lam", type=float, help="local pulling strength λ in [0, 1]"),
            flag("lam_global", type=float, help="global pulling strength λ_G in [0, 1]"),
            flag("proximal", type=float, help="per-step pull toward the last leaders (p/τ); 0 = off"),
            flag("leader_estimate", choices=LEADER_ESTIMATES, help="how a group's best worker is picked"),
            flag("loss_window", type=int, help="batches averaged for the train_loss estimate"),
            flag(
                "evaluate",
                choices=EVALUATED_MODELS,
                help="the model behind test_accuracy, the progress line and --target-accuracy (both are "
                "recorded at every evaluation; center: the mean of all workers, as the reference reports)",
            ),
        ),
    ),
    Algorithm(
        "easgd",
        easgd,
        "easgd",
        "lsgd_ray._internal.peer_server:EASGD",
        lambda c: f"tau={c.tau} beta={c.beta} alpha={c.alpha or 'beta/p'}",
        lambda c, S, sizes: easgd.expected_bytes(S, c.tau),
        report_every=lambda c: c.tau,
        comm_dtypes=("float32", "bfloat16"),
        flags=(
            flag("beta", type=float, help="moving rate α = β/p"),
            flag("alpha", type=float, help="moving rate α (overrides --beta)"),
        ),
    ),
    Algorithm(
        "downpour",
        downpour,
        "downpour",
        "lsgd_ray._internal.peer_server:Downpour",
        lambda c: f"n_push={c.n_push} n_fetch={c.n_fetch} rule={c.rule}",
        lambda c, S, sizes: downpour.expected_bytes(S, c.n_push, c.n_fetch),
        report_every=lambda c: min(c.n_push, c.n_fetch),
        fixed_mode="async",
        flags=(
            flag("n_push", type=int, help="push period (steps)"),
            flag("n_fetch", type=int, help="fetch period (steps)"),
            flag(
                "downpour_rule",
                "rule",
                choices=DOWNPOUR_RULES,
                help="the server adds each push times 1/W (mean) or whole (sum: Dean et al.'s rule)",
            ),
        ),
    ),
    Algorithm(
        "local_sgd",
        local_sgd,
        "local_sgd",
        "lsgd_ray._internal.peer_coordinators:LocalSGD",
        lambda c: f"tau={c.tau} tau_G={c.tau_global}",
        lambda c, S, sizes: local_sgd.expected_bytes(S, sizes, c.tau, c.tau_global),
        fixed_mode="sync",
        comm_dtypes=("float32", "bfloat16"),
    ),
    Algorithm(
        "diloco",
        diloco,
        "diloco",
        "lsgd_ray._internal.peer_coordinators:DiLoCo",
        lambda c: (
            f"H={c.tau_global} tau={c.tau or 'flat'} fragments={c.fragments} outer={c.outer.name} "
            f"lr={c.outer.lr} momentum={c.outer.momentum}"
        ),
        lambda c, S, sizes: diloco.expected_bytes(S, sizes, c.tau, c.tau_global, c.fragments),
        fixed_mode="sync",
        comm_dtypes=("float32", "bfloat16"),
        flags=(
            flag("fragments", type=int, help="Streaming DiLoCo's fragments (1 = plain DiLoCo)"),
            flag("outer_optimizer", "outer_name", default=_OUTER.name, choices=OPTIMIZERS, help="the outer optimizer"),
            flag("outer_lr", type=float, default=_OUTER.lr, help="outer learning rate"),
            flag("outer_momentum", type=float, default=_OUTER.momentum, help="outer momentum (Nesterov for sgd)"),
        ),
        build=_diloco_settings,
    ),
    Algorithm(
        "data_parallel",
        data_parallel,
        "data_parallel",
        "lsgd_ray._internal.peer_coordinators:DataParallel",
        lambda c: (
            "gradients all-reduced every step"
            + ("" if c.compression == "none" else f", compressed: {c.compression}")
            + (f" rank={c.powersgd_rank} from step {c.powersgd_start}" if c.compression == "powersgd" else "")
        ),
        lambda c, S, sizes: data_parallel.expected_bytes(S, sum(sizes), c.compression),
        fixed_mode="sync",
        flags=(
            flag("compression", choices=GRADIENT_COMPRESSIONS, help="torch's gradient hook"),
            flag("powersgd_rank", type=int, help="--compression powersgd: its rank"),
            flag("powersgd_start", type=int, help="--compression powersgd: plain steps first"),
        ),
    ),
    _gossip("dpsgd", corrective=False),
    _gossip("aldsgd", corrective=True),
]

ALGORITHMS: dict[str, Algorithm] = {row.name: row for row in _ROWS}
