"""What each algorithm should move, in theory: bytes per worker-step, averaged over workers.

Used by the tests (measured counts against theory) and by ``scripts/bench_comm.py``; each
algorithm's formula is in its rules module, named by its row in ``registry.py``. Loss
estimates (8 bytes a round) are left out: they are noise next to any model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lsgd_ray.config import TrainConfig


def expected_bytes(config: TrainConfig, weight_bytes: int, group_sizes: Sequence[int]) -> dict[str, float]:
    """``{"sent": ..., "received": ...}`` per worker-step for ``config.algorithm``.

    ``weight_bytes`` is S, the flat weights (parameters and float buffers); data-parallel moves
    gradients, which is S for a model without buffers.
    """
    from lsgd_ray.algorithms.registry import ALGORITHMS

    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"no communication theory for {config.algorithm!r}")
    return ALGORITHMS[config.algorithm].expected_bytes(config, weight_bytes, group_sizes)
