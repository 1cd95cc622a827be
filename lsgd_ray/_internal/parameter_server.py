"""ParameterServer: the center variable of EASGD and the shared weights of DOWNPOUR.

One actor, no GPU, never imports torch: the center is a NumPy array updated in place. Calls run
one at a time (``max_concurrency=1``), so every update is atomic with respect to every read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lsgd_ray.algorithms import easgd


class ParameterServer:
    def __init__(self, initial: np.ndarray) -> None:
        self.center = np.array(initial, dtype=initial.dtype, copy=True)
        self.updates = 0
        self.reads = 0

    def get(self) -> np.ndarray:
        """The current weights; Ray copies them into the object store once per call."""
        self.reads += 1
        return self.center

    def add(self, update: np.ndarray, scale: float) -> None:
        """``center += scale·update`` (EASGD: scale α and a worker's difference; DOWNPOUR: 1)."""
        self.center += scale * update
        self.updates += 1

    def elastic_round(self, alpha: float, *diffs: np.ndarray) -> np.ndarray:
        """Synchronous EASGD: ``x̃ ← x̃ + α Σ d_i``; returns the new center for the next round."""
        easgd.elastic_center_step(self.center, diffs, alpha)
        self.updates += 1
        return self.center

    def stats(self) -> dict[str, Any]:
        return {"updates": self.updates, "reads": self.reads, "nbytes": int(self.center.nbytes)}
