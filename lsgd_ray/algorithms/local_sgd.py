"""Local SGD / hierarchical model averaging (torch's ``HierarchicalModelAverager`` semantics).

Every worker runs its own optimizer; every τ steps the workers of a group (one node) replace
their weights by the group's average, and every τ_G steps all workers by the global average.
When both are due, only the global one runs (the averager picks the largest period that divides
the step). Momentum buffers stay local, as in torch's ``PostLocalSGDOptimizer``. Our flat
buffer also averages BatchNorm running statistics.

Averaging is an all-reduce (gloo ring): 2·S·(l−1)/l bytes each way per local average in groups
of l, 2·S·(W−1)/W per global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lsgd_ray.algorithms.data_parallel import ring_allreduce_bytes

Scope = Literal["global", "local"]


def averaging_scope(step: int, tau: int, tau_global: int) -> Scope | None:
    """Which average follows a worker's ``step``-th step: the largest due period wins."""
    if step % tau_global == 0:
        return "global"
    if step % tau == 0:
        return "local"
    return None


def next_averaging_step(step: int, tau: int, tau_global: int) -> int:
    return min((step // p + 1) * p for p in (tau, tau_global))


def average_(tensors: Sequence[Any]) -> None:
    """Replace every tensor by the mean of all of them (the single-process reference)."""
    mean = sum(t.clone() for t in tensors) / len(tensors)
    for t in tensors:
        t.copy_(mean)


def expected_bytes(weight_bytes: int, group_sizes: Sequence[int], tau: int, tau_global: int) -> dict[str, float]:
    """Per worker-step, averaged over workers (groups may differ in size)."""
    world = sum(group_sizes)
    # steps that are multiples of τ but not of τ_G average locally
    local_rate = (1 / tau) - (1 / _lcm(tau, tau_global))
    per_worker: list[float] = []
    for size in group_sizes:
        value = local_rate * ring_allreduce_bytes(weight_bytes, size)
        value += ring_allreduce_bytes(weight_bytes, world) / tau_global
        per_worker += [value] * size
    mean = sum(per_worker) / world
    return {"sent": mean, "received": mean}


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
