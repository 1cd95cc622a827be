"""DiLoCo's side of a Worker: the global weights and the outer optimizer, held identically by
every worker (the maths is ``lsgd_ray/algorithms/diloco.py``).

Each fragment of the flat weights has its global copy; the parameter part of it is a leaf
tensor stepped by that fragment's own outer optimizer (streaming needs one per fragment: a
single optimizer would decay the momentum of the fragments not synchronised). Float buffers
(BatchNorm statistics) are averaged, not stepped: an outer momentum means nothing for them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lsgd_ray._internal.lazy import lazy_module
from lsgd_ray.algorithms import diloco

if TYPE_CHECKING:
    import torch

    from lsgd_ray import optim
    from lsgd_ray._internal.protocol import WorkerSpec
    from lsgd_ray.flat import FlatState
else:  # imported on first use; the Worker's __init__ has imported torch by then (lazy.py)
    torch, optim = lazy_module("torch"), lazy_module("lsgd_ray.optim")


class DiLoCoWorkerMixin:
    """``outer_sync`` and the outer state's copies (replacement, checkpoint) for ``Worker``."""

    spec: WorkerSpec
    state: FlatState
    bytes_sent: float
    bytes_received: float
    exchanges: int
    _world_size: int
    _lock: threading.Lock

    _anchors: dict[str, torch.Tensor]
    _mean_about_: Callable[[torch.Tensor, torch.Tensor, Any, int], None]
    _mean_exact_: Callable[[torch.Tensor, Any, int], None]
    _reset: Callable[[np.ndarray | None], None]
    _outer: list[tuple[int, int, torch.nn.Parameter | None, optim.Optimizer | None]] | None = None
    _global_buffers: torch.Tensor | None = None
    _outer_steps = 0  # outer steps taken (or those of the worker whose outer state was loaded)

    def _outer_init(self) -> None:
        """Global weights = these weights (every worker starts from the same), fresh optimizers."""
        cfg = self.spec.diloco
        if cfg is None:
            return
        flat, params = self.state.flat, self.state.num_params
        self._outer = []
        for start, end in diloco.fragment_bounds(flat.numel(), cfg.fragments):
            stop = min(end, params)
            leaf = torch.nn.Parameter(flat[start:stop].detach().clone(), requires_grad=False) if stop > start else None
            optimizer = optim.build_optimizer([leaf], cfg.outer) if leaf is not None else None
            self._outer.append((start, end, leaf, optimizer))
        self._global_buffers = flat[params:].detach().clone()

    def outer_sync(self, fragment: int) -> None:
        """Average fragment ``fragment`` over all workers, take the outer step on its parameter
        part, and continue from the new global fragment (its buffers: from their average)."""
        assert self._outer is not None and self._global_buffers is not None, "not a DiLoCo worker"
        start, end, leaf, optimizer = self._outer[fragment]
        part = self.state.flat[start:end]
        world = getattr(self, "_world_size", 1)
        if world > 1 and self.spec.comm_dtype == "bfloat16":
            # the pseudo-gradients travel, not the weights: the workers' mean is the global
            # fragment (the same on every worker) minus the mean pseudo-gradient
            self._mean_about_(part, self._global_fragment(fragment), None, world)
        elif world > 1:
            self._mean_exact_(part, None, world)
        params = self.state.num_params
        if leaf is not None and optimizer is not None:
            with torch.no_grad():
                diloco.outer_step(leaf, optimizer, part[: leaf.numel()])
        if end > params:  # the fragment's float buffers: their average is the global copy
            low = max(start, params)
            self._global_buffers[low - params : end - params].copy_(part[low - start :])
        if "local" in self._anchors:  # comm_dtype bfloat16: the group's anchor for the next group average
            self._anchors["local"][start:end].copy_(part)
        self.exchanges += 1
        self._outer_steps += 1

    def _global_fragment(self, fragment: int) -> torch.Tensor:
        """The global weights of a fragment: its leaf, then its float buffers."""
        assert self._outer is not None and self._global_buffers is not None
        params = self.state.num_params
        start, end, leaf, _ = self._outer[fragment]
        pieces = [] if leaf is None else [leaf.detach()]
        if end > params:
            pieces.append(self._global_buffers[max(start, params) - params : end - params])
        return torch.cat(pieces)

    def global_weights(self) -> np.ndarray:
        """The global weights (what DiLoCo evaluates), on the CPU."""
        with self._lock:
            return self._global_flat().numpy()

    def outer_digest(self) -> tuple[int, str]:
        """(outer steps taken, a hash of the global weights and outer optimizers' state): the
        same on every worker, unless a replacement never got the others' outer state (its
        coordinator lost before it copied it), which the coordinator's set-up mends."""
        with self._lock:
            snapshot = self._outer_snapshot()
        digest = hashlib.blake2b(digest_size=16)
        tensors = [t for t in snapshot["leaves"] if t is not None] + [snapshot["buffers"]]
        for optimizer in snapshot["optimizers"]:
            for buffers in (optimizer or {}).get("state", {}).values():
                tensors += [v for _, v in sorted(buffers.items()) if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
        return snapshot["outer_steps"], digest.hexdigest()

    def outer_state(self) -> dict[str, Any]:
        """The global weights and outer optimizers, to make a replacement hold exactly what the
        others hold."""
        with self._lock:
            return self._outer_snapshot()

    def restart_from_global(self, state: dict[str, Any]) -> None:
        """Load another worker's ``outer_state()`` and go on from its global weights, with a
        fresh inner optimizer, as a replacement does. A worker whose copy differed may also hold
        local weights of nothing the others hold: a replacement whose source was lost with its
        owner starts from the initial weights, and averaging those into the next outer step
        (Nesterov, lr 0.7) wrecked the global weights of a chaos run for good."""
        with self._lock:
            self._load_outer(state)
            self._reset(self._global_flat().numpy())

    def _global_flat(self) -> torch.Tensor:  # under the worker's lock
        assert self._outer is not None and self._global_buffers is not None, "not a DiLoCo worker"
        parts = [leaf.detach() for _, _, leaf, _ in self._outer if leaf is not None]
        return torch.cat([*parts, self._global_buffers]).cpu()

    def _outer_snapshot(self) -> dict[str, Any]:  # under the worker's lock (also for checkpoints)
        assert self._outer is not None and self._global_buffers is not None, "not a DiLoCo worker"
        return {
            "leaves": [None if leaf is None else leaf.detach().cpu().clone() for _, _, leaf, _ in self._outer],
            "optimizers": [None if o is None else _cpu(o.state_dict()) for _, _, _, o in self._outer],
            "buffers": self._global_buffers.detach().cpu().clone(),
            "outer_steps": self._outer_steps,
        }

    def _load_outer(self, state: dict[str, Any]) -> None:  # under the worker's lock
        assert self._outer is not None and self._global_buffers is not None, "not a DiLoCo worker"
        if len(state["leaves"]) != len(self._outer):
            raise ValueError(f"outer state of {len(state['leaves'])} fragments, this run has {len(self._outer)}")
        for (_, _, leaf, optimizer), saved, saved_opt in zip(self._outer, state["leaves"], state["optimizers"]):
            if leaf is not None and optimizer is not None:
                with torch.no_grad():
                    leaf.copy_(saved)
                optimizer.load_state_dict(saved_opt)
        self._global_buffers.copy_(state["buffers"])
        self._outer_steps = int(state.get("outer_steps", 0))  # not in checkpoints before 2026-12-06


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    import copy

    from lsgd_ray.checkpoint import map_leaves

    return map_leaves(copy.deepcopy(state), torch.Tensor, torch.Tensor.cpu)
