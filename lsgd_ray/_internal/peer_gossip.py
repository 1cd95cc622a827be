"""The coordinator of the gossip peers, D-PSGD and AL-DSGD: every round each worker mixes its
weights with those its active neighbours published (read from the object store by reference),
on a graph that may rotate; AL-DSGD adds its corrective pull toward the best neighbours.
"""

from __future__ import annotations

from typing import Any

from lsgd_ray._internal.peer_coordinators import PeerCoordinator
from lsgd_ray.algorithms import gossip


class Gossip(PeerCoordinator):
    """D-PSGD and AL-DSGD: after each round every worker mixes with its active neighbours'
    published weights; this actor only hands out references and mixing coefficients."""

    # The weights a group published belong to its LocalLeader (it made the calls) and die with
    # it. A re-formed group's new workers start from the mean of the weights that survive; a
    # neighbour whose round read the lost ones mixes without them (their share stays its own).

    def _init_state(self) -> None:
        super()._init_state()
        # set here, not in setup: a new coordinator may re-form a group before it (revive_groups)
        self.pending: list[tuple] | None = None
        self.pending_from: list[list[int]] = []  # the neighbours each rank's pending mix reads
        self.published: list[Any] | None = None  # last round's published weights, by rank
        self.lost: set[int] = set()  # ranks whose published weights died with their LocalLeader

    def setup(self) -> None:
        c = self.cfg.gossip
        self.edges = gossip.base_graph(c.graph, self.num_workers, c.degree, c.graph_seed)
        corrective = self.cfg.algorithm == "aldsgd"
        self.coefs = {k: getattr(c, k) if corrective else 0.0 for k in ("c1", "c2", "p1", "p2")}

    def _next_step(self, step: int) -> int:
        return (step // self.cfg.gossip.tau + 1) * self.cfg.gossip.tau

    def _mix_args(self, num_steps: int) -> list[tuple]:
        if self.pending is None:
            return [(num_steps, 1.0, [])] * self.num_workers
        return [(num_steps, *p) for p in self.pending]

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        results, published = self._call("train_gossip", self._mix_args(num_steps), num_returns=2)
        active = gossip.active_edges(self.rounds, self.edges, self.cfg.gossip.rotation)
        adjacency = gossip.neighbours(active, self.num_workers)
        alpha = gossip.gossip_alpha(adjacency)
        estimates = [r["estimate"] for r in results]
        self.pending, self.pending_from = [], []
        for i in range(self.num_workers):
            weights = gossip.mixing_weights(i, adjacency, estimates, alpha, **self.coefs)
            others = [r for r in weights if r != i]
            self.pending.append((weights.get(i, 0.0), [weights[r] for r in others], *[published[r][0] for r in others]))
            self.pending_from.append(others)
        self.published, self.lost = [p[0] for p in published], set()
        return results

    def _group_lost(self, g: int) -> None:
        self.lost.update(self.group_ranks[g])

    def _without_lost_inputs(self, rank: int, args: tuple) -> tuple | None:
        num_steps, self_weight, weights, *refs = args
        if not self.pending_from or len(refs) != len(self.pending_from[rank]):
            return None  # not a mix of this round's pending neighbours
        keep = [j for j, r in enumerate(self.pending_from[rank]) if r not in self.lost]
        dropped = sum(w for j, w in enumerate(weights) if j not in keep)
        return (num_steps, self_weight + dropped, [weights[j] for j in keep], *[refs[j] for j in keep])

    def _replacement(self, rank: int, args: tuple) -> tuple[list[Any], tuple, str]:
        # The mean of the other workers' weights of the last round, mixed on the new worker
        # (its own are gone): gossip drives every worker toward that consensus, and it is the
        # model this algorithm evaluates. One neighbour's would tie it to that neighbour's
        # drift, and under a rotation it may have no active neighbour this round. Before any
        # publication every worker still holds the shared initial weights; once every other
        # worker's published weights are lost too (two workers, both struck), its own weights
        # in the last checkpoint are the nearest left.
        others = [ref for r, ref in enumerate(self.published or []) if r != rank and r not in self.lost]
        if not others:
            source, origin = self._checkpoint_source(rank) if self.published else ([None], "the initial weights")
            return source, (args[0], 1.0, []), origin
        share = 1.0 / len(others)
        return [None], (args[0], 0.0, [share] * len(others), *others), "the mean of the other workers' weights"

    def _finish(self) -> None:
        if self.pending is not None:
            # what the flush publishes is read only by a replacement in the next round
            _, published = self._call("train_gossip", self._mix_args(0), num_returns=2)
            self.published, self.lost = [p[0] for p in published], set()
            self.pending = None
