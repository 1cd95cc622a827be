"""Gradient compression with torch's own communication hooks
(``torch.distributed.algorithms.ddp_comm_hooks``): on DistributedDataParallel, as a Ray Train
user would add it (``register_comm_hook``), and on our workers' flat gradient
(``FlatGradientHook``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lsgd_ray.algorithms.data_parallel import ring_allreduce_bytes

COMM_HOOKS = ("powersgd", "bf16")


def register_comm_hook(ddp: Any, hook: str | None, rank: int = 2, start_iter: int = 10) -> None:
    """Gradient compression with torch's own DDP communication hooks, as a Ray Train user would
    add it: ``powersgd`` (rank-``rank`` PowerSGD with error feedback and warm start, plain
    all-reduce for the first ``start_iter`` steps, as torch's ``powerSGD_hook``) or ``bf16``."""
    if hook is None:
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=start_iter,
            use_error_feedback=True,
            warm_start=True,
        )
        ddp.register_comm_hook(state, _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook))
    elif hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    else:
        raise ValueError(f"comm_hook must be one of {COMM_HOOKS} or None, got {hook!r}")


def _one_bucket_at_a_time(hook: Any) -> Any:
    """``hook``, finished before it returns. PowerSGD chains two all-reduces per bucket in
    future callbacks; on gloo, with a model of more than one DDP bucket (over 1 MiB of
    gradients: CNN7), the callbacks of different buckets issued their collectives in a
    different order on different ranks, and gloo aborted the process ("Received data size
    doesn't match expected size", seen here on a 2 x 2 emulated cluster). Waiting for each
    bucket keeps the order DDP launches them in, the same on every rank, at the cost of
    overlapping one bucket's communication with the rest of the backward pass."""

    def in_order(state, bucket):  # no annotations: DDP accepts only its own types there
        future = hook(state, bucket)
        future.wait()
        return future

    return in_order


class FlatBucket:
    """The part of DDP's ``GradBucket`` that torch's hooks read, over a worker's flat gradient:
    one bucket holding every gradient. torch's ``GradBucket`` cannot be made from Python (no
    constructor), and the hooks are Python that calls only these methods; the per-parameter
    gradients are views of the flat one, as DDP's are views of its bucket."""

    def __init__(self, flat_grad: torch.Tensor, parameters: list[torch.Tensor]) -> None:
        self._buffer, self._parameters = flat_grad, parameters
        self._gradients = [p.grad for p in parameters]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._gradients  # type: ignore[return-value]

    def parameters(self) -> list[torch.Tensor]:
        return self._parameters

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


class FlatGradientHook:
    """torch's ``powerSGD_hook`` or ``bf16_compress_hook`` over the flat gradient, once per
    step, in the run's torch.distributed world (``process_group=None``): the averaged gradient
    replaces the flat one. Its state (PowerSGD's error feedback, warm-start matrices, step
    count and random state) goes into checkpoints and replicas (``state_dict``)."""

    def __init__(self, compression: str, rank: int, start: int, error_feedback: bool, warm_start: bool) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        self.compression = compression
        self.state: Any = None
        if compression == "powersgd":
            self.state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=start,
                use_error_feedback=error_feedback,
                warm_start=warm_start,
            )
            self.hook: Any = powerSGD_hook.powerSGD_hook
        elif compression == "bf16":
            self.hook = default_hooks.bf16_compress_hook
        else:
            raise ValueError(f"compression must be one of {COMM_HOOKS}, got {compression!r}")

    def __call__(self, flat_grad: torch.Tensor, parameters: list[torch.Tensor], world: int) -> float:
        """Average ``flat_grad`` over the world through the hook; returns the bytes each worker
        sent (and received): ring all-reduces of what the hook put on the wire."""
        plain = self.state is not None and self.state.iter < self.state.start_powerSGD_iter
        before = self.state.total_numel_after_compression if self.state is not None else 0
        averaged = self.hook(self.state, FlatBucket(flat_grad, parameters)).wait()
        if isinstance(averaged, list):
            averaged = averaged[0]
        if averaged.data_ptr() != flat_grad.data_ptr():
            flat_grad.copy_(averaged)
        if self.compression == "bf16":
            wire = flat_grad.numel() * 2
        elif plain:
            wire = flat_grad.numel() * flat_grad.element_size()
        else:  # P and Q of each compressed matrix, and the uncompressed tensors, all-reduced
            wire = (self.state.total_numel_after_compression - before) * flat_grad.element_size()
        return ring_allreduce_bytes(wire, world)

    def state_dict(self, error: bool = True) -> dict[str, Any] | None:
        """Tensors and plain values only (checkpoints load with ``weights_only``). ``error=False``:
        no error feedback, which a worker loading it starts again from zero (a replica; see
        ``replica_state``)."""
        s = self.state
        if s is None:
            return None
        name, keys, pos, has_gauss, cached = s.rng.get_state()
        return {
            "iter": s.iter,
            "error": {k: v.detach().cpu().clone() for k, v in s.error_dict.items()} if error else {},
            "p": {k: v.detach().cpu().clone() for k, v in s.p_memory_dict.items()},
            "q": {k: v.detach().cpu().clone() for k, v in s.q_memory_dict.items()},
            "rng": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "numel": [s.total_numel_before_compression, s.total_numel_after_compression],
        }

    def load_state_dict(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        s = self.state
        if s is None or saved is None:
            return
        s.iter = int(saved["iter"])
        s.error_dict = {int(k): v.to(device) for k, v in saved["error"].items()}
        s.p_memory_dict = {int(k): v.to(device) for k, v in saved["p"].items()}
        s.q_memory_dict = {int(k): v.to(device) for k, v in saved["q"].items()}
        name, keys, pos, has_gauss, cached = saved["rng"]
        s.rng.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        s.total_numel_before_compression, s.total_numel_after_compression = saved["numel"]
