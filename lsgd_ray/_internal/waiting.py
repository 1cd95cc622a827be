"""Waiting on many actors at once, with a timeout that names the ones that did not answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

STARTUP_TIMEOUT_S = 300.0  # an actor's start-up (imports, data loading) may take longer than a round


def startup_timeout(timeout_s: float) -> float:
    """How long actors may take to start: never less than ``STARTUP_TIMEOUT_S``."""
    return max(timeout_s, STARTUP_TIMEOUT_S)


class ActorTimeoutError(TimeoutError):
    """Some actors did not answer in time; the message names them."""


def get_all(refs: Sequence[ray.ObjectRef], timeout_s: float, names: Sequence[str], hint: str = "") -> list[Any]:
    """``ray.get`` of all ``refs`` (started beforehand), or an error naming the slow ones."""
    if not refs:
        return []
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        slow = [name for ref, name in zip(refs, names) if ref in set(pending)]
        raise ActorTimeoutError(
            f"no answer within {timeout_s:g}s from {', '.join(slow)}" + (f": {hint}" if hint else "")
        )
    return ray.get(list(refs))


def replies_or_deaths(refs: Sequence[ray.ObjectRef], timeout_s: float, names: Sequence[str]) -> list[tuple[Any, str]]:
    """Each actor's reply as ``(reply, "")``, or ``(None, reason)`` for one that died, waiting
    at most ``timeout_s`` in all. One that did not answer in time raises an error naming it; an
    error raised by an actor's own code propagates."""
    if not refs:
        return []
    ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[Any, str]] = []
    for ref, name in zip(refs, names):
        try:
            out.append((ray.get(ref, timeout=0), ""))
        except GetTimeoutError:
            raise ActorTimeoutError(f"no answer within {timeout_s:g}s from {name}") from None
        except RayActorError as exc:
            if isinstance(exc, RayTaskError):
                raise
            out.append((None, f"died ({type(exc).__name__})"))
    return out


def worker_handles(local_leaders: Sequence[Any], timeout_s: float) -> list[Any]:
    """Every worker's handle, by global rank (groups in order), asked of their LocalLeaders."""
    names = [f"LocalLeader {g}" for g in range(len(local_leaders))]
    per_group = get_all([ll.worker_handles.remote() for ll in local_leaders], timeout_s, names)
    return [handle for group in per_group for handle in group]
