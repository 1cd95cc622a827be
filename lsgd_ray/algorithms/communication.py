"""What each algorithm should move, in theory: bytes per worker-step, averaged over workers.

Used by the tests (measured counts against theory) and by ``scripts/bench_comm.py``. Loss
estimates (8 bytes a round) are left out: they are noise next to any model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lsgd_ray.algorithms import data_parallel, downpour, easgd, gossip, local_sgd

if TYPE_CHECKING:
    from lsgd_ray.config import TrainConfig


def expected_bytes(config: TrainConfig, weight_bytes: int, group_sizes: Sequence[int]) -> dict[str, float]:
    """``{"sent": ..., "received": ...}`` per worker-step for ``config.algorithm``.

    ``weight_bytes`` is S, the flat weights (parameters and float buffers); data-parallel moves
    gradients, which is S for a model without buffers.
    """
    S, W, name = weight_bytes, sum(group_sizes), config.algorithm
    if name == "lsgd":
        c = config.lsgd
        # every worker but the group's leader receives each local pull (only with several
        # groups), every worker but the global leader each global pull
        local = sum(size - 1 for size in group_sizes) / W / c.tau if len(group_sizes) > 1 else 0.0
        received = S * (local + (W - 1) / W / c.tau_global)
        return {"sent": float("nan"), "received": received}  # sent: one publication per leader
    if name == "data_parallel":
        return data_parallel.expected_bytes(S, W)
    if name == "local_sgd":
        return local_sgd.expected_bytes(S, group_sizes, config.local_sgd.tau, config.local_sgd.tau_global)
    if name == "easgd":
        return easgd.expected_bytes(S, config.easgd.tau)
    if name == "downpour":
        return downpour.expected_bytes(S, config.downpour.n_push, config.downpour.n_fetch)
    if name in ("dpsgd", "aldsgd"):
        g = config.gossip
        edges = gossip.base_graph(g.graph, W, g.degree, g.graph_seed)
        cycle = len(gossip.matchings(edges)) if g.rotation == "matchings" and edges else 1
        degrees = [
            gossip.expected_received_per_round(S, gossip.neighbours(gossip.active_edges(r, edges, g.rotation), W))
            for r in range(cycle)
        ]
        return {"sent": S / g.tau, "received": sum(degrees) / cycle / g.tau}
    raise ValueError(f"no communication theory for {name!r}")
