"""Waiting on many actors at once, with a timeout that names the ones that did not answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

STARTUP_TIMEOUT_S = 300.0  # an actor's start-up (imports, data loading) may take longer than a round


MARGIN_S = 30.0  # for the waiting actor's own work on top of what it waits for


@dataclass(frozen=True)
class Deadlines:
    """How long each kind of wait may take, all from the run's ``actor_timeout_s`` (``call_s``):
    a call that takes longer is reported as hung (by the actor that waited) and handled."""

    call_s: float  # one call on a worker, or one synchronous round of its steps

    @property
    def start_s(self) -> float:
        """An actor's start (imports, data loading): never less than ``STARTUP_TIMEOUT_S``."""
        return max(self.call_s, STARTUP_TIMEOUT_S)

    @property
    def nested_start_s(self) -> float:
        """An actor whose start waits on others' (a LocalLeader on its workers', a coordinator's
        set-up on its workers' collectives)."""
        return self.start_s + MARGIN_S

    @property
    def collective_s(self) -> float:
        """A call that runs a collective: a survivor's collective gives up within the gloo
        timeout (``call_s``) after a peer dies mid-call; waiting that out too keeps it from
        being taken for hung."""
        return 2 * self.call_s

    @property
    def first_call_s(self) -> float:
        """The first call on a process just started (a replacement's reset: its weights fetched
        on a node that may be busy with other starts)."""
        return self.call_s + MARGIN_S

    @staticmethod
    def through_leader(seconds: float) -> float:
        """A call on a LocalLeader that waits ``seconds`` on its workers (``call_s``,
        ``first_call_s`` on a re-formed group's new workers, ``collective_s``), then reports."""
        return seconds + MARGIN_S

    @property
    def server_s(self) -> float:
        """A ParameterServer's answer to a ping queued behind the workers' pushes: a busy one
        answers well within it, so one silent this long is hung."""
        return 3 * self.call_s

    @property
    def server_call_s(self) -> float:
        """An asynchronous loop's wait on its ParameterServer: under ``call_s``, so that the loop
        gives up (and its coordinator looks at the server) before its LocalLeader would take
        the worker for hung and kill it."""
        return self.call_s / 2

    @property
    def replace_s(self) -> float:
        """Replacing workers: a new process started, reset, perhaps after a collective gave up."""
        return self.start_s + self.first_call_s + self.call_s

    @property
    def group_round_s(self) -> float:
        """A synchronous LSGD round of a group: its workers' answers, then a hung one replaced
        (started and reset), with a margin for the LocalLeader's own work."""
        return self.call_s + self.start_s + self.first_call_s + MARGIN_S


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


LATE = "late"  # replies_or_deaths(late_ok=True): no answer in time (its node unreachable, or busy)


def replies_or_deaths(
    refs: Sequence[ray.ObjectRef], timeout_s: float, names: Sequence[str], late_ok: bool = False
) -> list[tuple[Any, str]]:
    """Each actor's reply as ``(reply, "")``, or ``(None, reason)`` for one that died, waiting
    at most ``timeout_s`` in all. One that did not answer in time raises an error naming it
    (``late_ok``: gives ``(None, LATE)``, as for one that Ray finds unreachable for now,
    ``ActorUnavailableError``: its node's link down, say); an error raised by an actor's own
    code propagates."""
    if not refs:
        return []
    ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[Any, str]] = []
    for ref, name in zip(refs, names):
        try:
            out.append((ray.get(ref, timeout=0), ""))
        except GetTimeoutError:
            if not late_ok:
                raise ActorTimeoutError(f"no answer within {timeout_s:g}s from {name}") from None
            out.append((None, LATE))
        except RayActorError as exc:
            if isinstance(exc, RayTaskError):
                raise
            if late_ok and isinstance(exc, ActorUnavailableError):  # unreachable for now, not dead
                out.append((None, LATE))
                continue
            out.append((None, f"died ({type(exc).__name__})"))
    return out


def answers(refs: Sequence[ray.ObjectRef], timeout_s: float) -> list[Any | None]:
    """Each actor's reply, or ``None`` for one that died or did not answer within ``timeout_s``
    (``replies_or_deaths`` with ``late_ok``, without the reasons). For the driver's side calls
    (stats, checkpoints, a coordinator's restart): a worker lost at that moment is its
    LocalLeader's to replace at the next round, not a reason to end the run. An error raised by
    an actor's own code propagates."""
    return [reply for reply, _ in replies_or_deaths(refs, timeout_s, [""] * len(refs), late_ok=True)]


def worker_handles(local_leaders: Sequence[Any], timeout_s: float) -> list[Any]:
    """Every worker's handle, by global rank (groups in order), asked of their LocalLeaders."""
    names = [f"LocalLeader {g}" for g in range(len(local_leaders))]
    per_group = get_all([ll.worker_handles.remote() for ll in local_leaders], timeout_s, names)
    return [handle for group in per_group for handle in group]
