"""Evaluator: holds the test split and a model in the driver's process, and scores the weights
an evaluation reads from the object store.

It is not an actor: the driver waits for every evaluation anyway (a synchronous run's rounds
pause; an asynchronous run's workers go on training meanwhile), and the driver has already
imported torch, so an actor would only add a process that imports Ray and torch at every start
(about 3 CPU-s: ``Trainer.start`` went from 6.2 to 5.5 s on 2 cores without it) and a process
to lose (docs/architecture.md#start-up).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lsgd_ray.data import resident
from lsgd_ray.flat import FlatState


class Evaluator:
    def __init__(
        self, model_factory: Any, dataset_factory: Any, batch_size: int, use_gpu: bool = False, all_cores: bool = False
    ) -> None:
        # Synchronous runs pause training while it evaluates, so it may use the whole node;
        # asynchronous ones keep training, so it takes one thread.
        self.threads = max(1, os.cpu_count() or 1) if all_cores else 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model_factory().to(self.device)
        self.state = FlatState(self.model)
        data = dataset_factory()
        x_test = data.augment.test(data.x_test) if data.augment else data.x_test  # e.g. the center crop
        # in memory: on the device; ImageFiles (streamed): decoded a chunk at a time below
        self.x, self.y = resident(x_test, self.device), data.y_test.to(self.device)
        self.batch_size = batch_size

    def baseline(self) -> dict[str, float]:
        """What a constant answer scores on the test set: the accuracy of always answering its
        most common class (``chance``) and the least loss of any constant answer (the entropy
        of its labels, ``constant_loss``)."""
        frequency = torch.bincount(self.y.cpu()).double() / max(len(self.y), 1)
        present = frequency[frequency > 0]
        return {"chance": float(frequency.max()), "constant_loss": float(-(present * present.log()).sum())}

    def evaluate(self, weights: np.ndarray) -> dict[str, Any]:
        """Test loss and accuracy of the flat ``weights`` (BatchNorm in eval mode, its own statistics)."""
        start = time.perf_counter()
        self.state.load(weights)
        with _threads(self.threads):
            scores = score(self.model, self.x, self.y, self.batch_size, self.device)
        finite = bool(np.isfinite(weights).all())
        return {**scores, "weights_finite": finite, "eval_s": time.perf_counter() - start}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, then as they were (the driver's
    process may be a user's notebook)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score(model: torch.nn.Module, x: Any, y: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (put in eval mode) on ``x``, ``y`` in batches;
    ``x`` may be a tensor or streamed ``ImageFiles`` (a slice decodes that chunk)."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(x[i : i + batch_size].to(device))
            target = y[i : i + batch_size]
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    n = len(y)
    return {"test_loss": total_loss / n, "test_accuracy": correct / n}
