"""Leader SGD: the pull toward a leader, leader selection and the communication schedule.

    x ← x − λ (x − x̃^j)   every τ steps   (local pull, toward the group's leader)
    x ← x − λ_G (x − x̃)   every τ_G steps (global pull, toward the best worker overall)

The local pull comes before the global one when both fall on the same step, as in the
reference code. With a single group only the global pull acts.

Besides the leader, a run may evaluate the *center*, the mean of all workers' weights (what the
reference code reports), computed hierarchically with ``weighted_mean``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # no torch at run time: the GlobalLeader imports this module
    import torch


def pull_toward(x: torch.Tensor, leader: torch.Tensor, strength: float) -> torch.Tensor:
    """``x ← x − strength·(x − leader)`` in place: one pass over memory, no temporaries."""
    if strength:
        x.lerp_(leader, strength)
    return x


def select_leader(estimates: Sequence[float]) -> int:
    """Index of the lowest loss estimate; ties go to the lowest index.

    A NaN or infinite estimate never leads. Returns -1 when no estimate is finite.
    """
    best, best_value = -1, math.inf
    for index, value in enumerate(estimates):
        if math.isfinite(value) and value < best_value:
            best, best_value = index, value
    return best


def weighted_mean(arrays: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ_k w_k·a_k / Σ_k w_k`` of flat weight arrays, in the arrays' dtype.

    The center, hierarchically: each LocalLeader averages its own workers (all weights 1), the
    GlobalLeader combines the group means weighted by their worker counts, which is the plain
    mean of all workers. ``arrays`` is read one at a time (a generator may fetch each only when
    its turn comes) into one float64 accumulator, so float32 weights lose nothing to the sum.
    """
    total: np.ndarray | None = None
    scratch: np.ndarray | None = None
    weight_sum = 0.0
    for array, weight in zip(arrays, weights, strict=True):
        if total is None:
            total, dtype = np.zeros(array.shape, np.float64), array.dtype
        if weight == 1:
            total += array  # numpy casts chunk by chunk: no float64 copy of the array
        else:
            scratch = np.multiply(array, weight, out=scratch, dtype=np.float64)
            total += scratch
        weight_sum += weight
    if total is None or weight_sum <= 0:
        raise ValueError(f"nothing to average: {len(weights)} arrays, weights summing to {weight_sum:g}")
    total /= weight_sum
    return total.astype(dtype, copy=False)


class ProximalTargets:
    """The reference's per-step proximal pull (its later version): after every local step,

        x ← x − (p/τ_G)(x − x̃_G)   toward the stored global leader, then
        x ← x − (p/τ)(x − x̃_L)     toward the stored local leader (only with several groups).

    Before the first communication both stored leaders are the initial weights. At each
    communication every worker of the pull, the leader itself included, stores the leader's
    weights it was sent (the leader: its own, as they were then).
    """

    ORDER = ("global", "local")

    def __init__(self, strength: float, tau: int, tau_global: int, num_groups: int) -> None:
        self.strengths = {"global": strength / tau_global}
        if num_groups > 1:
            self.strengths["local"] = strength / tau
        self.targets: dict[str, torch.Tensor] = {}

    def start(self, weights: torch.Tensor) -> None:
        """Both targets at ``weights`` (copied once): the initial weights, or a reset's."""
        start = weights.detach().clone()
        self.targets = dict.fromkeys(self.strengths, start)

    def refresh(self, kind: str, leader: torch.Tensor) -> None:
        """Store ``leader`` (not copied: a read-only view the caller keeps alive) as ``kind``'s target."""
        if kind in self.strengths:
            self.targets[kind] = leader

    def apply(self, x: torch.Tensor) -> None:
        for kind in self.ORDER:
            if kind in self.targets:
                pull_toward(x, self.targets[kind], self.strengths[kind])


class LossWindow:
    """Mean training loss over the last ``k`` batches: the reference code's leader estimate."""

    def __init__(self, k: int) -> None:
        self._values: deque[float] = deque(maxlen=k)

    def add(self, loss: float) -> None:
        self._values.append(float(loss))

    def values(self) -> list[float]:
        return list(self._values)

    def load(self, values: list[float]) -> None:
        self._values.clear()
        self._values.extend(float(v) for v in values)

    def mean(self) -> float:
        """``inf`` before the first batch, and while any loss in the window is not finite."""
        if not self._values:
            return math.inf
        mean = sum(self._values) / len(self._values)
        return mean if math.isfinite(mean) else math.inf


def pulls_due(step: int, tau: int, tau_global: int, num_groups: int) -> tuple[bool, bool]:
    """(local, global) pulls due after a worker's ``step``-th step in synchronous mode."""
    local = num_groups > 1 and step % tau == 0
    return local, step % tau_global == 0


def next_pull_step(step: int, tau: int, tau_global: int, num_groups: int) -> int:
    """The first step after ``step`` at which any pull is due."""
    periods = (tau, tau_global) if num_groups > 1 else (tau_global,)
    return min((step // p + 1) * p for p in periods)


def crossed(before: int, after: int, period: int) -> bool:
    """Whether a running total moved past a multiple of ``period`` (asynchronous schedule)."""
    return after // period > before // period


def sync_round(
    groups: list[list[torch.Tensor]],
    estimates: list[list[float]],
    lam: float,
    lam_global: float,
    local: bool,
    global_: bool,
) -> tuple[list[int], tuple[int, int]]:
    """The pulls of one synchronous round on flat tensors, in a single process.

    ``groups[j][i]`` is worker (j, i)'s flat parameters, updated in place; ``estimates``
    their loss estimates. Returns each group's leader index and the global leader (j, i).
    This is the reference the Ray transport is tested against.
    """
    local_leaders = [select_leader(group_estimates) for group_estimates in estimates]
    best_group = select_leader(
        [group[leader] if leader >= 0 else math.inf for group, leader in zip(estimates, local_leaders)]
    )
    global_leader = (best_group, local_leaders[best_group]) if best_group >= 0 else (-1, -1)
    if local:
        for group, leader in zip(groups, local_leaders):
            if leader >= 0:
                leader_x = group[leader].clone()
                for i, x in enumerate(group):
                    if i != leader:
                        pull_toward(x, leader_x, lam)
    if global_ and best_group >= 0:
        leader_x = groups[best_group][local_leaders[best_group]].clone()
        for group in groups:
            for x in group:
                pull_toward(x, leader_x, lam_global)
    return local_leaders, global_leader


def expected_bytes(weight_bytes: int, group_sizes: Sequence[int], tau: int, tau_global: int) -> dict[str, float]:
    """Per worker-step, averaged over workers: every worker but the group's leader receives each
    local pull (only with several groups), every worker but the global leader each global pull.
    Sent is not counted: one publication per leader, whoever it is."""
    world = sum(group_sizes)
    local = sum(size - 1 for size in group_sizes) / world / tau if len(group_sizes) > 1 else 0.0
    return {"sent": float("nan"), "received": weight_bytes * (local + (world - 1) / world / tau_global)}
