"""DOWNPOUR (Dean et al., 2012): an asynchronous parameter server.

Each worker trains its own copy and accumulates what its optimizer changed since its last push,
``v = x − x_base``. Every ``n_push`` steps it sends ``v`` and the server adds it,
``x̃ ← x̃ + v``; every ``n_fetch`` steps it replaces its copy with the server's, ``x ← x̃``.
With ``n_push = n_fetch = τ`` this is the DOWNPOUR of the EASGD paper (its Algorithm 3). Using
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


def apply_update(center: Any, update: Any) -> Any:
    """``x̃ ← x̃ + v`` in place on the server."""
    center += update
    return center


def due(step: int, period: int) -> bool:
    """Whether a push (or fetch) falls after a worker's ``step``-th step."""
    return step % period == 0


def expected_bytes(weight_bytes: int, n_push: int, n_fetch: int) -> dict[str, float]:
    return {"sent": weight_bytes / n_push, "received": weight_bytes / n_fetch}
