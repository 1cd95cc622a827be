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


def expected_bytes(grad_bytes: int, num_workers: int, compression: str = "none") -> dict[str, float]:
    """Per worker-step. bf16: half the bytes. PowerSGD: it depends on the layers' shapes, not
    on S alone (``powersgd_elements``): NaN here."""
    if compression == "powersgd":
        return {"sent": float("nan"), "received": float("nan")}
    per_step = ring_allreduce_bytes(grad_bytes // 2 if compression == "bf16" else grad_bytes, num_workers)
    return {"sent": per_step, "received": per_step}


def powersgd_elements(shapes: Sequence[Sequence[int]], rank: int, min_compression_rate: float = 2.0) -> int:
    """Elements all-reduced per step by torch's PowerSGD (once it has started): for each
    gradient seen as an n x m matrix (its first dimension by the rest), P (n x r) and Q (m x r)
    with r = min(n, m, rank) when that is at least ``min_compression_rate`` times smaller than
    n·m, else the n·m elements themselves (biases, small layers)."""
    total = 0
    for shape in shapes:
        n = shape[0] if shape else 1
        m = 1
        for d in shape[1:]:
            m *= d
        r = min(n, m, rank)
        compressed = (n + m) * r
        total += compressed if compressed * min_compression_rate < n * m else n * m
    return total
