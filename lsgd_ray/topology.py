"""Topology: a pure function from the cluster's nodes and the config to groups and placements.

No Ray calls here, so it is tested on fake node lists. ``nodes_from_ray`` converts the output of
``ray.nodes()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class PlacementError(ValueError):
    """The requested groups and workers do not fit on the cluster; the message says what is missing."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    resources: dict[str, float]
    address: str = ""


@dataclass(frozen=True)
class GroupPlan:
    """One group of workers under one LocalLeader, pinned to ``node_id``."""

    group: int
    node_id: str
    num_workers: int
    first_rank: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.num_workers)


@dataclass(frozen=True)
class Topology:
    groups: tuple[GroupPlan, ...]
    worker_resources: dict[str, float]

    @property
    def num_workers(self) -> int:
        return sum(g.num_workers for g in self.groups)

    @property
    def group_sizes(self) -> list[int]:
        return [g.num_workers for g in self.groups]

    def group_of(self, rank: int) -> tuple[int, int]:
        """(group, index within the group) of a global worker rank."""
        for g in self.groups:
            if rank in g.ranks:
                return g.group, rank - g.first_rank
        raise IndexError(f"no worker with rank {rank}; ranks are 0..{self.num_workers - 1}")


def worker_resources(cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    needs = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker > 0:
        needs["GPU"] = float(gpus_per_worker)
    return needs


def capacity(node: NodeInfo, needs: dict[str, float]) -> int:
    """How many workers with resource ``needs`` fit on ``node``."""
    return min(math.floor(node.resources.get(name, 0.0) / amount + 1e-9) for name, amount in needs.items())


def plan_topology(
    nodes: list[NodeInfo],
    *,
    num_groups: int | None = None,
    workers_per_group: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> Topology:
    """Groups and their nodes.

    Default: one group per node that can hold a worker, as many workers as fit on it (one per
    GPU, or one per ``cpus_per_worker`` CPUs). Explicit ``num_groups`` / ``workers_per_group``
    place equal groups round-robin over the nodes, spreading before doubling up.
    """
    needs = worker_resources(cpus_per_worker, gpus_per_worker)
    free = {n.node_id: capacity(n, needs) for n in nodes}
    usable = [n for n in nodes if free[n.node_id] > 0]

    if num_groups is None and workers_per_group is None:
        if not usable:
            raise PlacementError(_missing_message(nodes, needs, 1, 1))
        sizes = [(n.node_id, free[n.node_id]) for n in usable]
        return _build(sizes, needs)

    if workers_per_group is None:
        assert num_groups is not None  # both None returned above
        # As many equal groups as asked, as large as the smallest chosen node allows.
        ranked = sorted(usable, key=lambda n: -free[n.node_id])
        chosen = ranked[:num_groups]
        workers_per_group = min((free[n.node_id] for n in chosen), default=0)
        if num_groups > len(chosen):  # several groups share nodes
            workers_per_group = max(1, sum(free.values()) // num_groups)
    if num_groups is None:
        num_groups = sum(1 for n in nodes if free[n.node_id] >= workers_per_group)
        if num_groups == 0:
            raise PlacementError(_missing_message(nodes, needs, 1, workers_per_group))

    placed: list[tuple[str, int]] = []
    while len(placed) < num_groups:
        progress = False
        for node in nodes:
            if len(placed) < num_groups and free[node.node_id] >= workers_per_group:
                free[node.node_id] -= workers_per_group
                placed.append((node.node_id, workers_per_group))
                progress = True
        if not progress:
            raise PlacementError(_missing_message(nodes, needs, num_groups, workers_per_group))
    return _build(placed, needs)


def _build(sizes: list[tuple[str, int]], needs: dict[str, float]) -> Topology:
    groups, rank = [], 0
    for index, (node_id, size) in enumerate(sizes):
        groups.append(GroupPlan(group=index, node_id=node_id, num_workers=size, first_rank=rank))
        rank += size
    return Topology(groups=tuple(groups), worker_resources=needs)


def _missing_message(nodes: list[NodeInfo], needs: dict[str, float], num_groups: int, per_group: int) -> str:
    want = ", ".join(f"{name}={amount:g}" for name, amount in needs.items())
    have = (
        "; ".join(
            f"node {n.node_id[:8]}: " + ", ".join(f"{name}={n.resources.get(name, 0.0):g}" for name in needs)
            for n in nodes
        )
        or "no alive nodes"
    )
    missing = ", ".join(
        f"{name}={max(0.0, amount * num_groups * per_group - sum(n.resources.get(name, 0.0) for n in nodes)):g}"
        for name, amount in needs.items()
    )
    return (
        f"cannot place {num_groups} group(s) x {per_group} worker(s), each worker needing {want} "
        f"on one node per group. The cluster has {have}. Missing in total: {missing} "
        f"(or a node large enough for a whole group). Lower workers_per_group / num_groups, "
        f"cpus_per_worker / gpus_per_worker, or add nodes."
    )


def nodes_from_ray(ray_nodes: list[dict[str, Any]]) -> list[NodeInfo]:
    """Alive nodes from ``ray.nodes()``, in a stable order (head node first, then by id)."""
    alive = [n for n in ray_nodes if n.get("Alive", n.get("alive", False))]
    infos = [
        NodeInfo(
            node_id=n["NodeID"],
            resources={k: float(v) for k, v in n.get("Resources", {}).items()},
            address=n.get("NodeManagerAddress", ""),
        )
        for n in alive
    ]
    return sorted(infos, key=lambda n: ("node:__internal_head__" not in n.resources, n.node_id))


def node_with_room(
    nodes: list[NodeInfo],
    available: dict[str, dict[str, float]],
    needs: dict[str, float],
    count: int,
    planned: Mapping[str, int] | None = None,
) -> str | None:
    """The first of ``nodes`` whose *free* resources (``available``, by node id) take ``count``
    workers with resource ``needs`` now, or ``None``: where a group whose node was lost can go.
    ``planned``: by node id, the workers the run already has there, whose resources are theirs
    even while one of them is dead and not yet replaced: a node offers at most its total less
    theirs."""
    for node in nodes:
        free = available.get(node.node_id, {})
        held = (planned or {}).get(node.node_id, 0)
        room = {
            name: min(free.get(name, 0.0), node.resources.get(name, 0.0) - amount * held)
            for name, amount in needs.items()
        }
        if all(room[name] + 1e-9 >= amount * count for name, amount in needs.items()):
            return node.node_id
    return None


def check_available(topology: Topology, available: dict[str, dict[str, float]]) -> None:
    """Refuse at once a plan whose nodes lack *free* resources now (others' actors hold them),
    instead of letting its workers wait forever to be scheduled."""
    problems = []
    for node_id in dict.fromkeys(g.node_id for g in topology.groups):
        workers = sum(g.num_workers for g in topology.groups if g.node_id == node_id)
        free = available.get(node_id, {})
        for name, amount in topology.worker_resources.items():
            need = amount * workers
            if free.get(name, 0.0) + 1e-9 < need:
                problems.append(
                    f"node {node_id[:8]} needs {name}={need:g} for {workers} worker(s) but has "
                    f"{free.get(name, 0.0):g} free (missing {need - free.get(name, 0.0):g})"
                )
    if problems:
        raise PlacementError(
            "the cluster has the resources in total but they are in use (by other actors or jobs): "
            + "; ".join(problems)
            + ". Wait for them to finish, or ask for fewer workers."
        )
