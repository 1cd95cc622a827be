"""How a LocalLeader repairs its group: it learns which workers failed in a call (``Failure``:
died, hung, or alive but waiting on an input a failed worker never gave) and replaces a lost
worker by a new process on its node, started from the weights the caller names (those lost
too: from the last weights it kept, else from the run's newest checkpoint); a diverged worker
(synchronous LSGD) is reset to the leader's weights."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from lsgd_ray._internal.protocol import Failure, FailureKind
from lsgd_ray._internal.waiting import Deadlines, get_all
from lsgd_ray.topology import GroupPlan

REPLACE_ATTEMPTS = 3  # a replacement that dies before it is ready is replaced in turn, this many times in all


def checkpoint_source(path: str | None, rank: int | None, log: Any) -> tuple[list[ray.ObjectRef | None], str]:
    """Where a worker restarts when no live weights are left: worker ``rank``'s weights in the
    newest checkpoint under ``path`` (read at each call: only when every source of live weights
    is gone), or, ``rank`` not saved or None, its leader's; with no usable checkpoint, the
    initial weights (wrapped, and their name)."""
    if path is None:
        return [None], "the initial weights"
    from lsgd_ray.checkpoint import CheckpointError, leader_worker, load_latest  # imports torch: only here

    try:
        state, where = load_latest(path)
    except CheckpointError as exc:
        log.warning(f"checkpoint {path} unusable ({exc}): starting from the initial weights")
        return [None], "the initial weights"
    saved = {w["rank"]: w for w in state["workers"]}
    source = saved[rank] if rank in saved else leader_worker(state)
    return [ray.put(source["weights"].numpy())], f"worker {source['rank']}'s weights in checkpoint {where.name}"


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
    last_checkpoint: str | None  # the run's newest, as its coordinator last said (note_checkpoint)
    steps: int | None  # the group's step count after its last round (or its start)

    def note_checkpoint(self, path: str | None) -> None:
        """The run's newest checkpoint: where a worker restarts when every weights this
        LocalLeader could restart it from were lost."""
        self.last_checkpoint = path

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
        else the last weights this LocalLeader kept (``_kept_sources``)."""
        if leader >= 0:
            return self.workers[leader].get_weights.remote(count=False), "the leader's weights"
        if global_pull and global_pull[0] is not None:
            return global_pull[0], "the global leader's weights"
        return next(self._kept_sources())

    def _kept_sources(self) -> Iterator[tuple[ray.ObjectRef | None, str]]:
        """The weights a worker can restart from when no live worker gives them, best first: the
        group leader's this LocalLeader last published (it owns them, so they outlive a
        coordinator or another node), the global leader's it last pulled toward, the leader's in
        the run's newest checkpoint (read only if it comes to that), and last the initial weights
        (``None``). A published reference may still be lost: its producer hung and was killed
        before it answered (a lone worker, the leader of its group, hung while publishing)."""
        if self._last_published[0] is not None:
            yield self._last_published[0], "the group leader's last published weights"
        if self._last_global[0] is not None:
            yield self._last_global[0], "the global leader's last weights"
        (ref,), origin = checkpoint_source(self.last_checkpoint, None, self.log)
        if ref is not None:
            yield ref, origin
        yield None, "the initial weights"

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
        """Wait for ``new`` to start, then reset it to ``source`` at ``steps``: its ``ready()``
        and the name of what it started from. Weights lost before it read them (their producer
        or owner died) give way to the next of ``_kept_sources``; no weights given (``None``):
        the initial ones (the caller may load others after, as data-parallel does)."""
        info = get_all([new.ready.remote()], self.deadlines.start_s, [f"replacement {name}"])[0]
        given = source[0] if source else None
        candidates: Iterator[tuple[ray.ObjectRef | None, str]] = iter([(None, origin)])
        if given is not None:
            kept = ((ref, kind) for ref, kind in self._kept_sources() if ref is None or ref != given)
            candidates = itertools.chain([(given, origin)], kept)
        for ref, origin in candidates:
            try:
                get_all([new.reset_to.remote(ref, steps)], self.deadlines.first_call_s, [f"replacement {name}"])
                return info, origin
            except RayTaskError as exc:  # those weights were lost: the next
                if ref is None:
                    raise
                self.log.warning(f"{name}: {origin} were lost ({type(exc).__name__}): trying the next source")
        raise AssertionError("unreachable: the last source, the initial weights, returns or raises")

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
