"""Elastic averaging SGD (Zhang, Choromanska & LeCun, 2015).

Every τ steps each worker and the center variable x̃ pull toward each other with moving rate α:

    x^i ← x^i − α (x^i − x̃)          (each worker, with the center it read)
    x̃   ← x̃ + α Σ_i (x^i − x̃)        (the center, with the differences the workers sent)

Both use the values from before the exchange. The paper sets α = β/p for p workers (β = 0.9).
The center is what gets evaluated. Asynchronously each worker exchanges on its own every τ of
its own steps and the center adds each difference as it arrives.

Communication per exchange: a worker receives the center (S bytes) and sends its difference
(S bytes): 2S/τ per worker-step.

The functions work on NumPy arrays and torch tensors alike (the center lives in a torch-free
actor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def moving_rate(beta: float, num_workers: int) -> float:
    """α = β / p, the paper's choice, keeping the center's total pull β independent of p."""
    return beta / num_workers


def elastic_worker_step(x: Any, center: Any, alpha: float) -> Any:
    """``x ← x − α(x − x̃)`` in place; returns the difference ``x − x̃`` from before the step,
    which is what the center needs."""
    diff = x - center
    x -= alpha * diff
    return diff


def elastic_center_step(center: Any, diffs: Iterable[Any], alpha: float) -> Any:
    """``x̃ ← x̃ + α Σ_i d_i`` in place, for the differences ``d_i = x^i − x̃`` from one exchange."""
    for diff in diffs:
        center += alpha * diff
    return center


def expected_bytes(weight_bytes: int, tau: int) -> dict[str, float]:
    """Per worker-step: the center in, the difference out."""
    return {"sent": weight_bytes / tau, "received": weight_bytes / tau}
