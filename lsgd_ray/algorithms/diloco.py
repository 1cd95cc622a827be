"""DiLoCo (Douillard et al. 2023) and Streaming DiLoCo: local steps, then an outer step on the
averaged pseudo-gradient.

Every worker takes H = τ_G inner steps with the run's optimizer; then

    Δ = θ_g − mean_k θ_k          (the pseudo-gradient, averaged over all W workers)
    θ_g ← OuterOpt(θ_g, Δ)        (default SGD lr 0.7, momentum 0.9, Nesterov)

and every worker continues from the new θ_g. Every worker holds θ_g and the outer optimizer's
state and takes the same outer step on the same averaged Δ (one all-reduce of the weights, as in
torchft), so they stay identical without a server. Outer SGD with lr 1 and no momentum makes
θ_g the plain average: local SGD with period H.

Hierarchical (``tau`` set): between outer steps the workers of a group (one node) average their
weights every τ steps, so only the outer step crosses the links between nodes.

Streaming (``fragments`` F > 1): the flat weights are cut into F contiguous fragments, each
with its own θ_g and outer optimizer; fragment f is synchronised at steps (f+1)·H/F + m·H, so
one fragment crosses the network every H/F steps and each every H steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lsgd_ray.algorithms.data_parallel import ring_allreduce_bytes

if TYPE_CHECKING:  # no torch at run time: the coordinator imports this module
    import torch

    from lsgd_ray.optim import Optimizer


def fragment_bounds(n: int, fragments: int) -> list[tuple[int, int]]:
    """``fragments`` contiguous [start, end) ranges covering ``range(n)``, sizes differing by at most 1."""
    if not 1 <= fragments <= max(n, 1):
        raise ValueError(f"cannot cut {n} weights into {fragments} fragments")
    base, extra = divmod(n, fragments)
    bounds, start = [], 0
    for f in range(fragments):
        end = start + base + (1 if f < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def outer_due(step: int, tau_global: int, fragments: int = 1) -> int | None:
    """The fragment synchronised after a worker's ``step``-th step, or None."""
    period = tau_global // fragments
    if step <= 0 or step % period:
        return None
    return (step // period - 1) % fragments


def local_due(step: int, tau: int | None, tau_global: int, fragments: int = 1) -> bool:
    """Hierarchical DiLoCo: whether a group average follows ``step`` (never where an outer step does)."""
    return tau is not None and step % tau == 0 and outer_due(step, tau_global, fragments) is None


def next_sync_step(step: int, tau: int | None, tau_global: int, fragments: int = 1) -> int:
    """The first step after ``step`` at which anything is exchanged."""
    periods = [tau_global // fragments] + ([tau] if tau is not None else [])
    return min((step // p + 1) * p for p in periods)


def outer_step(global_: torch.Tensor, optimizer: Optimizer, averaged: torch.Tensor) -> None:
    """One outer step: ``global_`` (a leaf tensor, the optimizer's only parameter) moves along the
    pseudo-gradient ``global_ − averaged``; ``averaged`` (the workers' mean) is then overwritten
    with the new global weights, which is where every worker continues from."""
    global_.grad = global_.detach() - averaged
    optimizer.step()
    global_.grad = None
    averaged.copy_(global_.detach())


def expected_bytes(
    weight_bytes: int, group_sizes: Sequence[int], tau: int | None, tau_global: int, fragments: int = 1
) -> dict[str, float]:
    """Per worker-step, averaged over workers: one all-reduce of every fragment every H steps
    (together: of the whole weights) over all W workers and, hierarchical, one all-reduce of
    the weights within the group at the multiples of τ where no outer step falls."""
    world = sum(group_sizes)
    outer = ring_allreduce_bytes(weight_bytes, world) / tau_global
    # steps that are multiples of τ but not of H/F average within the group
    local_rate = 1 / tau - 1 / math.lcm(tau, tau_global // fragments) if tau is not None else 0.0
    per_worker: list[float] = []
    for size in group_sizes:
        per_worker += [outer + local_rate * ring_allreduce_bytes(weight_bytes, size)] * size
    mean = sum(per_worker) / world
    return {"sent": mean, "received": mean}
