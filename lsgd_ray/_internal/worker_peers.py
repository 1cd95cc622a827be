"""The peers' side of a Worker: collectives (data-parallel SGD, local SGD), the elastic exchange
(EASGD), parameter-server pushes and fetches (DOWNPOUR) and neighbour mixing (D-PSGD, AL-DSGD).

A mixin of ``Worker``: it uses the worker's flat state, step loop and byte counters. The maths
is in ``lsgd_ray.algorithms``; this file only moves data.
"""

from __future__ import annotations

import copy
import datetime
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lsgd_ray._internal.lazy import lazy_module
from lsgd_ray.algorithms import easgd
from lsgd_ray.algorithms.data_parallel import ring_allreduce_bytes
from lsgd_ray.algorithms.gossip import mix_
from lsgd_ray.wire import encode

if TYPE_CHECKING:
    import torch

    from lsgd_ray._internal.protocol import WorkerSpec
    from lsgd_ray.comm_hooks import FlatGradientHook
    from lsgd_ray.flat import FlatState
    from lsgd_ray.optim import Optimizer
else:  # imported on first use; the Worker's __init__ has imported torch by then (lazy.py)
    torch = lazy_module("torch")


def free_address() -> str:
    """A TCP rendezvous address on this node for torch.distributed."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class PeerWorkerMixin:
    """Methods the peer coordinators call on a Worker."""

    # what the Worker provides
    rank: int
    spec: WorkerSpec
    state: FlatState
    model: torch.nn.Module
    optimizer: Optimizer
    device: torch.device
    bytes_sent: float
    bytes_received: float
    _lock: threading.Lock
    _collective_lock: threading.Lock
    train: Callable[..., dict[str, Any]]
    estimate: Callable[[], float]

    _dist_group: Any = None  # this worker's group's process group (local SGD)
    _allreduce_grads = False  # data-parallel SGD
    _grad_hook: FlatGradientHook | None = None  # data-parallel SGD with gradient compression
    exchanges = 0
    base: torch.Tensor | None = None  # DOWNPOUR: weights at the last push or fetch
    # comm_dtype bfloat16: per scope ("local", "global"), the weights every member held after
    # the last exchange (local SGD, DiLoCo's group averages); see _mean_
    _anchors: dict[str, torch.Tensor] = {}  # replaced per instance in setup_collective

    # ------------------------------------------------------------------ collectives

    def collective_address(self) -> str:
        return free_address()

    def setup_collective(
        self, address: str, world_size: int, groups: list[list[int]], backend: str, allreduce_grads: bool
    ) -> None:
        """Join the run's torch.distributed world (every worker calls this at the same time) and
        the process group of every group (each rank must create all of them, in order)."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.spec.collective_timeout_s)
        with self._collective_lock:
            try:
                dist.init_process_group(
                    backend, init_method=address, rank=self.rank, world_size=world_size, timeout=timeout
                )
                for ranks in groups:
                    group = dist.new_group(ranks, timeout=timeout)
                    if self.rank in ranks:
                        self._dist_group, self._group_size = group, len(ranks)
            except BaseException:
                self._leave_collective()  # free to join again (the coordinator tries again)
                raise
        self._world_size = world_size
        self._allreduce_grads = allreduce_grads
        # identical on every worker at a fresh start; after a re-formation _mean_ finds out
        bf16 = self.spec.comm_dtype == "bfloat16"
        self._anchors = {scope: self.state.flat.detach().clone() for scope in ("local", "global")} if bf16 else {}

    def _after_backward(self) -> None:
        """Data-parallel SGD: average the flat gradient over all workers before the step (or
        have torch's compression hook do it: ``DataParallelConfig.compression``)."""
        if self._allreduce_grads and self._world_size > 1:
            import torch.distributed as dist

            if self._grad_hook is not None:
                params: list[torch.Tensor] = list(self.model.parameters())
                moved = self._grad_hook(self.state.grad, params, self._world_size)
            else:
                dist.all_reduce(self.state.grad)
                self.state.grad.div_(self._world_size)
                grad = self.state.grad
                moved = ring_allreduce_bytes(grad.numel() * grad.element_size(), self._world_size)
            self.bytes_sent += moved
            self.bytes_received += moved
            self.exchanges += 1

    def average_weights(self, scope: str | None) -> None:
        """Local SGD: replace the flat weights by their mean over the group or over everyone
        (``comm_dtype`` bfloat16: the mean of the changes since the anchor, see ``_mean_``)."""
        if scope is None:
            return
        size = self._world_size if scope == "global" else self._group_size
        if size < 2:
            return
        group = None if scope == "global" else self._dist_group
        self._mean_(self.state.flat, scope, group, size)
        for kept in ("local", "global") if scope == "global" else ("local",):
            if kept in self._anchors:  # the closer the anchor, the smaller what travels
                self._anchors[kept].copy_(self.state.flat)
        self.exchanges += 1

    def _mean_(self, flat: torch.Tensor, scope: str, group: Any, size: int) -> None:
        """``flat`` ← its mean over ``group``. In float32 the weights are all-reduced as they
        are. In bfloat16, weights themselves would lose every update below 2^-8 of their size
        at each average; what travels is instead the change from an anchor every member holds
        identically (x̄ = a + mean(x_i − a), exact for any common a), rounded to bfloat16. A
        24-byte all-reduce first checks that the anchors are identical (a replacement, a reset
        or a resume leaves them apart): if not, this one average is exact in float32."""
        anchor = self._common_anchor(scope, group, size)
        if anchor is not None:
            self._mean_about_(flat, anchor, group, size)
            return
        self._mean_exact_(flat, group, size)

    def _mean_exact_(self, flat: torch.Tensor, group: Any, size: int) -> None:
        """``flat`` ← its mean over ``group``, all-reduced as it is. On a copy: an all-reduce
        that fails (a member lost mid-way) leaves partial sums in its buffer, and the weights
        must stay as they were for the round done again (a DiLoCo chaos run went on from
        survivors whose weights were half summed, and its outer steps drove it to chance)."""
        import torch.distributed as dist

        total = flat.clone()
        dist.all_reduce(total, group=group)
        torch.div(total, size, out=flat)
        moved = ring_allreduce_bytes(flat.numel() * flat.element_size(), size)
        self.bytes_sent += moved
        self.bytes_received += moved

    def _mean_about_(self, flat: torch.Tensor, anchor: torch.Tensor, group: Any, size: int) -> None:
        """``flat`` ← its mean over ``group`` as ``anchor + mean(flat − anchor)``, the changes
        travelling in bfloat16; ``anchor`` must be the same on every member (local SGD's last
        common average, DiLoCo's global weights)."""
        import torch.distributed as dist

        change = ((flat - anchor) / size).to(torch.bfloat16)
        dist.all_reduce(change, group=group)
        torch.add(anchor, change.to(flat.dtype), out=flat)
        moved = ring_allreduce_bytes(change.numel() * change.element_size(), size)
        self.bytes_sent += moved
        self.bytes_received += moved

    def _common_anchor(self, scope: str, group: Any, size: int) -> torch.Tensor | None:
        """This worker's anchor for ``scope`` if every member of ``group`` holds the same one."""
        import torch.distributed as dist

        if self.spec.comm_dtype == "float32":
            return None
        anchor = self._anchors.get(scope)
        if anchor is None:
            digest = torch.tensor([1, 0, 0], dtype=torch.int64, device=self.device)
        else:  # a position-weighted sum of the bits (integer arithmetic: wraps, never rounds)
            positions = torch.arange(1, anchor.numel() + 1, dtype=torch.int64, device=anchor.device)
            checksum = (anchor.view(torch.int32).to(torch.int64) * positions).sum()
            digest = torch.stack([torch.zeros_like(checksum), checksum, -checksum])
        dist.all_reduce(digest, op=dist.ReduceOp.MAX, group=group)
        moved = ring_allreduce_bytes(digest.numel() * digest.element_size(), size)
        self.bytes_sent += moved
        self.bytes_received += moved
        missing, highest, negated_lowest = digest.tolist()
        return anchor if missing == 0 and highest == -negated_lowest else None

    def close_collective(self) -> None:
        """Leave the process group (also one a dead peer broke: the group is then re-formed)."""
        with self._collective_lock:
            self._leave_collective()

    def _leave_collective(self) -> None:
        """Leave the process group, and what a failed join leaves behind: torch names each
        group after a per-process counter that a join advances before it meets its peers and
        that only destroying the world group resets, so a worker whose join failed would name
        the next try's groups apart from its peers' and every handshake would time out (a
        chaos run's abort: each try of a set-up failed after one worker had been slow)."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        if dist.is_initialized():
            dist.destroy_process_group()
        distributed_c10d._world.group_count = 0  # what destroying the world group does
        self._dist_group = None

    def replica_state(self) -> dict[str, Any]:
        """Data-parallel SGD: what makes another worker a replica of this one (weights, optimizer
        state, step count, and PowerSGD's state but for its error feedback), on the CPU; for a
        group re-formed after a failure. Every member of that group starts error feedback again
        from zero: each worker's error is its own residual, and the residuals largely cancel in
        the group's mean, which is what is still owed to the weights. Copied to every worker, one
        survivor's residual was applied whole at the next step (on the tests' model a gradient 30x
        the largest of the 21 steps before), and a chaos run whose group re-formed every few
        seconds went to chance."""
        from lsgd_ray.checkpoint import map_leaves

        with self._lock:
            optimizer = map_leaves(copy.deepcopy(self.optimizer.state_dict()), torch.Tensor, torch.Tensor.cpu)
            hook = self._grad_hook.state_dict(error=False) if self._grad_hook is not None else None
            return {
                "weights": self.state.to_numpy(copy=True),
                "optimizer": optimizer,
                "steps": self.steps,
                "hook": hook,
            }

    def load_replica(self, replica: dict[str, Any]) -> None:
        """Become a replica of the worker ``replica_state()`` came from."""
        with self._lock:
            self.state.load(self.on_device(replica["weights"]))
            self.optimizer.load_state_dict(replica["optimizer"])
            self.steps = int(replica["steps"])
            if self._grad_hook is not None:
                self._grad_hook.load_state_dict(replica["hook"], self.device)

    # ------------------------------------------------------------------ EASGD (synchronous)

    def train_elastic(self, num_steps: int, alpha: float, center: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """``num_steps`` local steps, then the elastic exchange with ``center`` (a view of the
        object store); returns the round's result and the difference ``x − x̃`` for the center, as it
        travels (``comm_dtype``)."""
        result = self.train(num_steps)
        diff = easgd.elastic_worker_step(self.state.flat, self.on_device(center), alpha)
        sent = encode(diff.cpu().numpy(), self.spec.comm_dtype)
        self.bytes_received += center.nbytes
        self.bytes_sent += sent.nbytes
        self.exchanges += 1
        return result, sent

    # ------------------------------------------------------------------ D-PSGD / AL-DSGD

    def train_gossip(
        self, num_steps: int, self_weight: float, weights: list[float], *neighbours: np.ndarray
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Mix with the neighbours' weights published last round (``x ← self_weight·x + Σ w·x_j``),
        take ``num_steps`` steps, and publish this worker's weights for its next neighbours."""
        if neighbours or self_weight != 1.0:
            mix_(self.state.flat, self_weight, [self.on_device(n) for n in neighbours], weights)
            self.bytes_received += sum(n.nbytes for n in neighbours)
            self.exchanges += 1
        if not num_steps:  # the coordinator's flush: only a replacement may read what it publishes
            return {"rank": self.rank, "estimate": self.estimate(), "compute_s": 0.0}, self.state.to_numpy()
        result = self.train(num_steps)
        self.bytes_sent += self.state.nbytes
        return result, self.state.to_numpy()

    # ------------------------------------------------------------------ helpers

    def on_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Weights that arrived (a view of the object store on the CPU), as a tensor on this
        worker's device in its dtype: no copy for float32 on the CPU; bfloat16 (``comm_dtype``)
        crosses to the device as it travelled and is widened there."""
        from lsgd_ray.flat import as_tensor, decode  # imported by the Worker's __init__: a lookup here (lazy.py)

        source = decode(as_tensor(array))
        if source.device != self.device:
            source = source.to(self.device)
        return source if source.dtype == self.state.flat.dtype else source.to(self.state.flat.dtype)
