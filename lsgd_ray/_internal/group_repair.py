"""How a LocalLeader repairs its group: it learns which workers failed in a call (``Failure``:
died, hung, or alive but waiting on an input a failed worker never gave) and replaces a lost
worker by a new process on its node, started from the weights the caller names; a diverged
worker (synchronous LSGD) is reset to the leader's weights."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from lsgd_ray._internal.protocol import Failure, FailureKind
from lsgd_ray._internal.waiting import Deadlines, get_all
from lsgd_ray.topology import GroupPlan

REPLACE_ATTEMPTS = 3  # a replacement that dies before it is ready is replaced in turn, this many times in all


class GroupRepair:
    """The failure handling of ``LocalLeader``, which provides the group it works on."""

    plan: GroupPlan
    ranks: list[int]
    workers: list[Any]
    timeout_s: float
    deadlines: Deadlines
    events: list[dict[str, Any]]
    log: Any
    _spawn: Callable[[int, int], Any]  # (index, rank) -> a new worker on this node
    _pull_lock: threading.Lock
    _in_flight: dict[tuple[int, str], ray.ObjectRef]
    _last_global: list[ray.ObjectRef | None]  # wrapped: the last global leader's weights received
    _last_published: list[ray.ObjectRef | None]  # wrapped: the group leader's last published (or start) weights
    steps: int | None  # the group's step count after its last round (or its start)

    def _names(self) -> list[str]:
        return [f"worker {r} (group {self.plan.group})" for r in self.ranks]

    def _gather(
        self, calls: list[ray.ObjectRef], timeout_s: float | None = None, collective: bool = False
    ) -> tuple[list[Any], list[Failure]]:
        """Every worker's answer, waiting at most the timeout in all, and the failures (by index
        in the group): a worker that died or did not answer in time gets ``None``, and so does
        one that lives but lost an argument (a dead worker's weights). An exception raised by the
        worker's own code is not a failure of the worker: it propagates, unless ``collective``
        (a collective that failed with a dead peer: ``BROKEN``)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
        results: list[Any] = []
        failures: list[Failure] = []
        for index, ref in enumerate(calls):
            try:
                results.append(ray.get(ref, timeout=0))
                continue
            except GetTimeoutError:
                failures.append(Failure(index, FailureKind.HUNG, f"{timeout_s:g}s"))
            except RayTaskError as exc:
                # RayTaskError(ActorDiedError): an argument's producer died; RayTaskError(OwnerDiedError):
                # the process that owned it did (a LocalLeader lost with its node owned the leader's weights)
                if isinstance(exc, (RayActorError, ObjectLostError)):
                    failures.append(Failure(index, FailureKind.LOST_INPUT))
                elif collective:
                    failures.append(Failure(index, FailureKind.BROKEN, str(exc).strip().splitlines()[-1]))
                else:
                    raise
            except RayActorError as exc:
                failures.append(Failure(index, FailureKind.DIED, type(exc).__name__))
            results.append(None)
        return results, failures

    def _index_of(self, rank: int) -> int | None:
        """The index in this group of global ``rank`` (``None``: another group's)."""
        return self.ranks.index(rank) if rank in self.ranks else None

    @staticmethod
    def _waiting_on_inputs(
        failures: list[Failure], pulls: list[tuple], producers: tuple[int | None, int | None]
    ) -> list[Failure]:
        """A worker that did not answer may only be waiting for a pull's weights that a failed
        worker (a hung leader) never published: ``LOST_INPUT``, not hung itself. ``producers``:
        the indexes of the workers whose weights the local and the global pull carry (``None``:
        not this group's)."""
        hung = {f.rank for f in failures if f.kind is FailureKind.HUNG}
        out = []
        for f in failures:
            local_ref, _, global_ref, _ = pulls[f.rank]
            waits_on = [
                p
                for ref, p in zip((local_ref, global_ref), producers)
                if ref is not None and p != f.rank and not ray.wait([ref], timeout=0, fetch_local=False)[0]
            ]
            if f.kind is FailureKind.HUNG and waits_on and all(p is None or p in hung for p in waits_on):
                f = Failure(f.rank, FailureKind.LOST_INPUT, "its pull's weights never came")
            out.append(f)
        return out

    def _weights_source(self, leader: int, global_pull: list[ray.ObjectRef] | None) -> tuple[ray.ObjectRef | None, str]:
        """Where a replaced or diverged worker restarts from, and its name: the group leader's
        weights; when the group has no usable worker, the global leader's sent with this call,
        else the group leader's this LocalLeader last published (it owns them, so they outlive
        a coordinator or another node), else the global leader's it last pulled toward."""
        if leader >= 0:
            return self.workers[leader].get_weights.remote(count=False), "the leader's weights"
        if global_pull and global_pull[0] is not None:
            return global_pull[0], "the global leader's weights"
        if self._last_published[0] is not None:
            return self._last_published[0], "the group leader's last published weights"
        if self._last_global[0] is not None:
            return self._last_global[0], "the global leader's last weights"
        return None, "the initial weights"

    def replace_worker(
        self,
        index: int,
        reason: str,
        source: list[ray.ObjectRef | None],
        steps: int | None = None,
        origin: str = "the leader's weights",
        respawn: bool = True,
    ) -> dict[str, Any]:
        """Replace worker ``index`` by a new process on this node, started from ``source``
        (wrapped; ``None``: its initial weights) with the group's step count; ``origin`` names
        the source in the log line. ``respawn=False``: the worker is already a new process
        (this LocalLeader replaced a dead one and started its group afresh)."""
        if respawn:
            with contextlib.suppress(Exception):
                ray.kill(self.workers[index])
        new = self._spawn(index, self.ranks[index]) if respawn else self.workers[index]
        name = self._names()[index]
        for attempt in range(1, REPLACE_ATTEMPTS + 1):
            try:
                info, origin = self._start_replacement(new, name, source, steps, origin)
                break
            except RayActorError as exc:
                if isinstance(exc, RayTaskError) or attempt == REPLACE_ATTEMPTS:
                    raise
                # the new process died before it was ready (struck in turn, or its start failed)
                self.log.warning(f"replacement {name} died before it was ready ({type(exc).__name__}): another")
                with contextlib.suppress(Exception):
                    ray.kill(new)
                new = self._spawn(index, self.ranks[index])
        self.workers[index] = new
        with self._pull_lock:  # the dead worker's pulls never run
            self._in_flight = {key: ref for key, ref in self._in_flight.items() if key[0] != index}
        event = {
            "event": "worker_replaced",
            "rank": self.ranks[index],
            "group": self.plan.group,
            "reason": reason,
            "step": steps,
            "pid": info["pid"],
            "from": origin,
            "time": time.time(),
        }
        self.events.append(event)
        self.log.warning(f"{name} {reason}: replaced (new pid {info['pid']}) from {origin}")
        return event

    def _start_replacement(
        self, new: Any, name: str, source: list[ray.ObjectRef | None], steps: int | None, origin: str
    ) -> tuple[dict[str, Any], str]:
        """Wait for ``new`` to start, then reset it to ``source`` (or, those weights lost, its
        initial weights) at ``steps``: its ``ready()`` and the name of what it started from."""
        info = get_all([new.ready.remote()], self.deadlines.start_s, [f"replacement {name}"])[0]
        try:
            if source and source[0] is not None:
                get_all([new.reset_to.remote(source[0], steps)], self.deadlines.first_call_s, [f"replacement {name}"])
                return info, origin
        except RayTaskError:  # the leader's weights were lost too: start from the initial weights
            origin = "the initial weights"
        # no weights given: the initial ones (the caller may load others after, as data-parallel does)
        get_all([new.reset_to.remote(None, steps)], self.deadlines.first_call_s, [f"replacement {name}"])
        return info, origin

    def _reset_diverged(self, diverged: list[int], source: ray.ObjectRef | None, steps: int | None) -> None:
        """Synchronous mode: workers whose loss went NaN/inf restart from the leader's weights."""
        if not diverged or source is None:
            return
        get_all([self.workers[i].reset_to.remote(source) for i in diverged], self.timeout_s, self._names())
        for i in diverged:
            self._reset_event(i, steps)

    def _reset_event(self, index: int, step: int | None) -> None:
        rank = self.ranks[index]
        self.events.append(
            {
                "event": "worker_reset",
                "rank": rank,
                "group": self.plan.group,
                "reason": "loss NaN or infinite",
                "step": step,
                "time": time.time(),
            }
        )
        self.log.warning(f"worker {rank}: loss NaN or infinite, reset to the leader")

    def reset_workers(self, source: list[ray.ObjectRef | None], steps: int | None) -> None:
        """Start every worker of this (re-formed) group from ``source`` at ``steps``; until the
        group publishes a leader, ``source`` is also where a worker it loses restarts from."""
        get_all([w.reset_to.remote(source[0], steps) for w in self.workers], self.deadlines.first_call_s, self._names())
        if steps is not None:
            self.steps = steps
        if source[0] is not None:
            self._last_published = [source[0]]
