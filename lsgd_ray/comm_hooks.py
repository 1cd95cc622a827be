"""Gradient compression on DistributedDataParallel with torch's own communication hooks
(``torch.distributed.algorithms.ddp_comm_hooks``), as a Ray Train user would add it."""

from __future__ import annotations

from typing import Any

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
