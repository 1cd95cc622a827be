"""A Worker's checkpoint: everything needed to continue it exactly, taken between two steps
(in asynchronous mode by its training thread) and loaded before a resumed run trains."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lsgd_ray._internal.lazy import lazy_module
from lsgd_ray.algorithms.lsgd import LossWindow, ProximalTargets

if TYPE_CHECKING:
    import torch

    from lsgd_ray.comm_hooks import FlatGradientHook
    from lsgd_ray.data import BatchStream
    from lsgd_ray.flat import FlatState
    from lsgd_ray.optim import Optimizer
else:  # imported on first use; the Worker's __init__ has imported torch by then (lazy.py)
    torch = lazy_module("torch")


class WorkerStateMixin:
    """``get_state`` / ``set_state`` of ``Worker``, which provides the state itself."""

    rank: int
    device: torch.device
    model: torch.nn.Module
    state: FlatState
    optimizer: Optimizer
    steps: int
    stream: BatchStream  # or DealtStream, its subclass
    augment_rng: torch.Generator
    window: LossWindow
    _recent: list[torch.Tensor]
    proximal: ProximalTargets | None
    _lock: threading.Lock
    _async: bool
    _between_steps: Callable[[str], Any]
    _flush_losses: Callable[[], None]
    _outer: list | None
    _grad_hook: FlatGradientHook | None
    _outer_snapshot: Callable[[], dict[str, Any]]
    _load_outer: Callable[[dict[str, Any]], None]

    COUNTERS = (
        "compute_s",
        "bytes_sent",
        "bytes_received",
        "pulls",
        "pull_s",
        "exchanges",
        "last_loss",
        "resets",
        "skipped_pulls",
    )

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue this worker exactly: weights, integer buffers, optimizer
        state, step count, batch order, RNG states, loss window and counters (all on the CPU,
        tensors and plain values only, so a checkpoint loads with ``weights_only``)."""
        with self._lock:
            if not self._async:
                return self._checkpoint_state()
        return self._between_steps("state")

    def _checkpoint_state(self) -> dict[str, Any]:
        from lsgd_ray.checkpoint import map_leaves  # imports torch (lazy.py)

        self._flush_losses()
        return {
            "rank": self.rank,
            "weights": self.state.flat.detach().cpu().clone(),
            "int_buffers": {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if not v.is_floating_point()
            },
            "optimizer": map_leaves(copy.deepcopy(self.optimizer.state_dict()), torch.Tensor, torch.Tensor.cpu),
            "steps": self.steps,
            "stream": self.stream.state(),
            "augment_rng": self.augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "window": self.window.values(),
            "counters": {k: getattr(self, k) for k in self.COUNTERS},
            "outer": self._outer_snapshot() if self._outer is not None else None,  # DiLoCo
            "grad_hook": self._grad_hook.state_dict() if self._grad_hook is not None else None,  # PowerSGD
            "proximal_targets": {
                k: v.detach().cpu().clone() for k, v in (self.proximal.targets if self.proximal else {}).items()
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``get_state()``'s snapshot (before the run's training starts)."""
        if state["rank"] != self.rank:
            raise ValueError(f"worker {self.rank} was handed worker {state['rank']}'s checkpoint")
        with self._lock:
            self.state.load(state["weights"])
            buffers = self.model.state_dict()
            for name, value in state["int_buffers"].items():
                buffers[name].copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps = int(state["steps"])
            self.stream.load_state(state["stream"])
            self.augment_rng.set_state(state["augment_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.window.load(state["window"])
            self._recent.clear()
            for name, value in state["counters"].items():
                setattr(self, name, value)
            if state.get("outer") is not None:
                self._load_outer(state["outer"])
            if self._grad_hook is not None:
                self._grad_hook.load_state_dict(state.get("grad_hook"), self.device)
            # checkpoints from before 2026-12-04 kept (target, strength) pairs as "last_leaders"
            targets = state.get("proximal_targets") or {k: v for k, (v, _) in state.get("last_leaders", {}).items()}
            if self.proximal is not None and targets:
                self.proximal.targets = {k: v.to(self.device) for k, v in targets.items()}
