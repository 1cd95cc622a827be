"""Connect to Ray and plan where a run's actors go, before any of them is created."""

from __future__ import annotations

import logging
import math
import os
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.algorithms.gossip import base_graph
from lsgd_ray.config import ConfigError, TrainConfig
from lsgd_ray.topology import PlacementError, Topology, check_available, nodes_from_ray, plan_topology

AVAILABILITY_GRACE_S = 5.0  # how long busy resources may take to free up before placement is refused


def connect(cfg: TrainConfig) -> bool:
    """Join the cluster ``cfg.address`` names, or start an embedded one; whether this run
    started Ray (and so stops it). Nothing when Ray is already initialised."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if cfg.address:  # "auto": RAY_ADDRESS (as `lsgd-ray cluster run` sets it), else the local cluster
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    else:
        # An embedded single-node Ray sized for the requested workers: logical CPUs may
        # exceed physical cores; each worker then runs torch with one thread.
        wanted = (cfg.num_groups or 1) * (cfg.workers_per_group or 1) * cfg.cpus_per_worker
        num_cpus = max(os.cpu_count() or 1, math.ceil(wanted))
        # address="local": a new instance even if `ray start` left a cluster address behind
        # (plain ray.init() would try to join it, and refuses num_cpus then).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def place(cfg: TrainConfig) -> Topology:
    """The groups and their nodes for ``cfg`` on the cluster as it is now; refused with a
    ``PlacementError`` when the resources are not free (after a short grace: a run that just
    ended frees them a moment after ``ray.kill``), or a ``ConfigError`` for a gossip graph the
    number of workers cannot have."""
    topology = plan_topology(
        nodes_from_ray(ray.nodes()),
        num_groups=cfg.num_groups,
        workers_per_group=cfg.workers_per_group,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.gpus_per_worker,
    )
    try:
        from ray._private.state import available_resources_per_node
    except ImportError:  # a private API: without it, the actors' ready() timeout still applies
        available_resources_per_node = None  # type: ignore[assignment]
    if available_resources_per_node is not None:
        deadline = time.perf_counter() + AVAILABILITY_GRACE_S
        while True:
            try:
                check_available(topology, available_resources_per_node())
                break
            except PlacementError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.25)
    if ALGORITHMS[cfg.algorithm].needs_graph:  # the graph depends on the number of workers
        g = cfg.gossip
        try:
            base_graph(g.graph, topology.num_workers, g.degree, g.graph_seed)
        except ValueError as exc:
            raise ConfigError(f"gossip graph for {topology.num_workers} workers: {exc}") from None
    return topology


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The coordinator runs on the driver's node (the evaluator in the driver's process), so it
    dies only with the driver, never with a node of workers. A hard affinity: with ``soft=True``
    Ray places this zero-CPU actor on other nodes when the driver's has no CPUs (a head node with
    ``num_cpus=0``), and a coordinator that died with a group's node could not be restarted."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
