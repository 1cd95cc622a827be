"""Synchronous data-parallel SGD: gradients averaged over all workers every step (what DDP and
Ray Train's TorchTrainer do).

The average is a torch.distributed all-reduce among the worker actors (gloo on CPU, NCCL when
each worker has a whole GPU of its own). gloo's all-reduce is a ring (reduce-scatter, then
all-gather): each worker sends and receives 2·S·(W−1)/W bytes per step for S bytes of gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def average_gradients(grads: Sequence[Any]) -> Any:
    """The reference: the mean of the workers' gradients (each a mean over its own batch), i.e.
    the gradient of the mean loss over the union of their batches when batches are equal."""
    total = grads[0].clone() if hasattr(grads[0], "clone") else grads[0].copy()
    for g in grads[1:]:
        total += g
    return total / len(grads)


def ring_allreduce_bytes(nbytes: int, num_workers: int) -> float:
    """Bytes each worker sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2.0 * nbytes * (num_workers - 1) / num_workers if num_workers > 1 else 0.0


def expected_bytes(grad_bytes: int, num_workers: int) -> dict[str, float]:
    per_step = ring_allreduce_bytes(grad_bytes, num_workers)
    return {"sent": per_step, "received": per_step}
