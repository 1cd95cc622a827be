"""Every algorithm in one table: one row says what a run needs to know about it.

Adding an algorithm is a row here, a rules module (pure functions over flat tensors, in this
package), its settings dataclass in ``lsgd_ray.config`` (when it has settings) and, if none of
the coordinators fits its communication pattern, a coordinator in ``lsgd_ray._internal``.
The config's ``algorithm`` choices, the CLI's ``--algorithm`` choices, the coordinator the
Trainer starts, the start-up line, the asynchronous report period and the byte theory the tests
and ``scripts/bench_comm.py`` check all come from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lsgd_ray.algorithms import data_parallel, diloco, downpour, easgd, gossip, local_sgd, lsgd
from lsgd_ray.wire import WIRE_SIZE

if TYPE_CHECKING:
    from lsgd_ray._internal.coordinator import Coordinator
    from lsgd_ray.config import TrainConfig

Bytes = dict[str, float]


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
    ),
    _gossip("dpsgd", corrective=False),
    _gossip("aldsgd", corrective=True),
]

ALGORITHMS: dict[str, Algorithm] = {row.name: row for row in _ROWS}
