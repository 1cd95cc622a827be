"""ParameterServer: the center variable of EASGD and the shared weights of DOWNPOUR.

One actor, no GPU, never imports torch: the center is a NumPy array updated in place. Calls run
one at a time (``max_concurrency=1``), so every update is atomic with respect to every read.
With ``comm_dtype`` bfloat16 (EASGD) the center travels to the workers and their differences
travel back in bfloat16 (``lsgd_ray.wire``); the center itself stays float32.
"""

from __future__ import annotations

import numpy as np

from lsgd_ray.algorithms import easgd
from lsgd_ray.wire import decode, encode


class ParameterServer:
    def __init__(self, initial: np.ndarray, comm_dtype: str = "float32") -> None:
        self.center = np.array(initial, dtype=initial.dtype, copy=True)
        self.comm_dtype = comm_dtype

    def get(self) -> np.ndarray:
        """The current weights as they travel to the workers; Ray copies them into the object
        store once per call."""
        return encode(self.center, self.comm_dtype)

    def weights(self) -> np.ndarray:
        """The current weights in full precision (evaluation, checkpoints, replacements)."""
        return self.center

    def set(self, weights: np.ndarray) -> None:
        """Overwrite the center (resuming from a checkpoint)."""
        self.center[:] = weights

    def add(self, update: np.ndarray, scale: float) -> None:
        """``center += scale·update`` (EASGD: scale α and a worker's difference; DOWNPOUR: 1)."""
        self.center += scale * decode(update)

    def elastic_round(self, alpha: float, *diffs: np.ndarray) -> np.ndarray:
        """Synchronous EASGD: ``x̃ ← x̃ + α Σ d_i``; returns the new center for the next round."""
        easgd.elastic_center_step(self.center, [decode(d) for d in diffs], alpha)
        return self.get()
