"""DOWNPOUR (Dean et al., 2012): an asynchronous parameter server.

Each worker trains its own copy and accumulates what its optimizer changed since its last push,
``v = x − x_base``. Every ``n_push`` steps it sends ``v`` and the server adds it scaled,
``x̃ ← x̃ + s·v``; every ``n_fetch`` steps it replaces its copy with the server's, ``x ← x̃``.
The rule "sum" (``s = 1``) with ``n_push = n_fetch = τ`` is the DOWNPOUR of Dean et al. and of
the EASGD paper (its Algorithm 3); the default "mean" (``s = 1/W`` for W workers) keeps the
server moving as far as one worker does, where "sum" moves it W times as far. Using
the change in the weights rather than raw gradients lets any local optimizer (momentum, Adam)
drive it; for plain SGD ``v = −η Σ g``, the accumulated gradient step.

The server's weights are what gets evaluated. Communication: S/n_push sent and S/n_fetch
received per worker-step.
"""

from __future__ import annotations

from typing import Any


def accumulated_update(x: Any, base: Any) -> Any:
    """What the worker's own steps changed since ``base`` (its last push or fetch)."""
    return x - base


def server_scale(rule: str, num_workers: int) -> float:
    """``s`` for a push: ``1/W`` under "mean", 1 under "sum" (the same with one worker)."""
    return 1.0 / num_workers if rule == "mean" else 1.0


def apply_update(center: Any, update: Any, scale: float = 1.0) -> Any:
    """``x̃ ← x̃ + s·v`` in place on the server."""
    center += scale * update
    return center


def due(step: int, period: int) -> bool:
    """Whether a push (or fetch) falls after a worker's ``step``-th step."""
    return step % period == 0


def expected_bytes(weight_bytes: int, n_push: int, n_fetch: int) -> dict[str, float]:
    return {"sent": weight_bytes / n_push, "received": weight_bytes / n_fetch}
