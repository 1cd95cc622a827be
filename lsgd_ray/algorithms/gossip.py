"""Decentralized averaging on a communication graph: D-PSGD and AL-DSGD.

D-PSGD (gossip): after its local steps each worker mixes with its active neighbours,

    y_i = (1 − d_i·α)·x_i + α·Σ_{j ∈ N(i)} x_j          (d_i = active degree)

with α = 1/(max active degree + 1), so the mixing matrix is symmetric and doubly stochastic.

AL-DSGD (../shared/seeds/004_…, as its reference code does it) then corrects toward the best
neighbour b (lowest loss among i and its neighbours) and the max-degree neighbour m:

    y ← (1 − c1 − c2)·y + c1·x_b + c2·x_m
    y ← y − p1·(y − x_b) − p2·(y − x_m)

Everything is linear in the weights, so a round reduces to one coefficient per participant,
computed from scalars (losses, degrees) by ``mixing_weights`` and applied by ``mix_`` inside the
worker: no central actor touches the weights. With c1 = c2 = p1 = p2 = 0 it is D-PSGD.

Dynamic graphs: the base graph (ring, torus, random regular, complete) is split into matchings;
with rotation each round activates the next matching (degree ≤ 1: pairwise averaging), so over
a cycle every edge is used while each worker talks to one neighbour at a time. Without rotation
the whole base graph is active every round. A worker receives degree·S bytes per round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

Edge = tuple[int, int]
GRAPHS = ("ring", "torus", "random_regular", "complete")
ROTATIONS = ("matchings", "none")


def base_graph(kind: str, n: int, degree: int = 3, seed: int = 0) -> list[Edge]:
    """Undirected edges ``(i, j)``, ``i < j``, sorted."""
    edges: set[Edge] = set()
    if kind == "ring":
        edges = {_edge(i, (i + 1) % n) for i in range(n) if n > 1}
    elif kind == "torus":
        rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
        cols = n // rows
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c
                edges.add(_edge(i, r * cols + (c + 1) % cols))
                edges.add(_edge(i, ((r + 1) % rows) * cols + c))
    elif kind == "random_regular":
        edges = _random_regular(n, degree, seed)
    elif kind == "complete":
        edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
    else:
        raise ValueError(f"unknown graph {kind!r}; choose one of: {', '.join(GRAPHS)}")
    return sorted(e for e in edges if e[0] != e[1])


def _edge(i: int, j: int) -> Edge:
    return (min(i, j), max(i, j))


def _random_regular(n: int, degree: int, seed: int) -> set[Edge]:
    """A uniformly drawn simple ``degree``-regular graph (pairing model with restarts)."""
    if not 0 < degree < n or n * degree % 2:
        raise ValueError(f"a {degree}-regular graph on {n} nodes needs 0 < degree < n and n·degree even")
    rng = random.Random(seed)
    for _ in range(1000):
        stubs = [i for i in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        edges = {_edge(stubs[k], stubs[k + 1]) for k in range(0, len(stubs), 2)}
        if len(edges) == len(stubs) // 2 and all(i != j for i, j in edges):
            return edges
    raise ValueError(f"could not draw a simple {degree}-regular graph on {n} nodes")


def matchings(edges: Sequence[Edge]) -> list[list[Edge]]:
    """Split ``edges`` into matchings (greedy edge colouring: at most 2Δ−1 of them)."""
    colours: list[list[Edge]] = []
    used: list[set[int]] = []
    for i, j in edges:
        for colour, nodes in zip(colours, used):
            if i not in nodes and j not in nodes:
                colour.append((i, j))
                nodes.update((i, j))
                break
        else:
            colours.append([(i, j)])
            used.append({i, j})
    return colours


def active_edges(round_index: int, edges: Sequence[Edge], rotation: str) -> list[Edge]:
    """The edges used in round ``round_index``: all of them, or the next matching."""
    if rotation == "none" or not edges:
        return list(edges)
    parts = matchings(edges)
    return parts[round_index % len(parts)]


def neighbours(edges: Sequence[Edge], n: int) -> list[list[int]]:
    result: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        result[i].append(j)
        result[j].append(i)
    return [sorted(r) for r in result]


def gossip_alpha(adjacency: Sequence[Sequence[int]]) -> float:
    """α = 1/(Δ + 1) for the active graph's largest degree Δ."""
    return 1.0 / (max((len(a) for a in adjacency), default=0) + 1)


def mixing_weights(
    i: int,
    adjacency: Sequence[Sequence[int]],
    losses: Sequence[float],
    alpha: float,
    c1: float = 0.0,
    c2: float = 0.0,
    p1: float = 0.0,
    p2: float = 0.0,
) -> dict[int, float]:
    """Coefficients ``{rank: weight}`` (summing to 1) such that worker ``i``'s new weights are
    ``Σ weight·x_rank``: the gossip mix, then AL-DSGD's two corrections."""
    nbrs = list(adjacency[i])
    weights = {i: 1.0 - len(nbrs) * alpha}
    for j in nbrs:
        weights[j] = weights.get(j, 0.0) + alpha
    if not (c1 or c2 or p1 or p2):
        return weights
    candidates = [i, *nbrs]
    finite = [r for r in candidates if math.isfinite(losses[r])]
    best = min(finite, key=lambda r: (losses[r], r)) if finite else i
    # the max-degree neighbour; ties go to the lower loss, then the lower rank
    max_degree = min(candidates, key=lambda r: (-len(adjacency[r]), _loss_key(losses[r]), r))
    keep = (1.0 - c1 - c2) * (1.0 - p1 - p2)
    weights = {r: w * keep for r, w in weights.items()}
    weights[best] = weights.get(best, 0.0) + (1.0 - p1 - p2) * c1 + p1
    weights[max_degree] = weights.get(max_degree, 0.0) + (1.0 - p1 - p2) * c2 + p2
    return weights


def _loss_key(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def mix_(x: Any, self_weight: float, others: Sequence[Any], weights: Sequence[float]) -> Any:
    """``x ← self_weight·x + Σ w_k·others_k`` in place (torch tensors)."""
    if self_weight != 1.0:
        x.mul_(self_weight)
    for other, w in zip(others, weights):
        if w:
            x.add_(other, alpha=w)
    return x


def gossip_round(
    xs: Sequence[Any], adjacency: Sequence[Sequence[int]], losses: Sequence[float], **coefs: float
) -> None:
    """One synchronous mixing round on flat tensors in a single process (the test reference)."""
    alpha = gossip_alpha(adjacency)
    old = [x.clone() for x in xs]
    for i, x in enumerate(xs):
        weights = mixing_weights(i, adjacency, losses, alpha, **coefs)
        others = [r for r in weights if r != i]
        mix_(x, weights.get(i, 0.0), [old[r] for r in others], [weights[r] for r in others])


def expected_received_per_round(weight_bytes: int, adjacency: Sequence[Sequence[int]]) -> float:
    """Mean bytes a worker receives in one round: its active degree times S."""
    return weight_bytes * sum(len(a) for a in adjacency) / max(len(adjacency), 1)


def expected_bytes(
    weight_bytes: int, num_workers: int, graph: str, degree: int, graph_seed: int, rotation: str, tau: int
) -> dict[str, float]:
    """Per worker-step, averaged over workers and over one cycle of the rotation: each
    worker publishes its weights once a round and reads those of its active neighbours."""
    edges = base_graph(graph, num_workers, degree, graph_seed)
    cycle = len(matchings(edges)) if rotation == "matchings" and edges else 1
    received = [
        expected_received_per_round(weight_bytes, neighbours(active_edges(r, edges, rotation), num_workers))
        for r in range(cycle)
    ]
    return {"sent": weight_bytes / tau, "received": sum(received) / cycle / tau}
