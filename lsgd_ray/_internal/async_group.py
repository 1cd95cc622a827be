"""A LocalLeader in asynchronous mode: its workers run their own loops and report every few
steps; it pulls the group toward its leader every l·τ steps summed over the group and forwards
the global leader's pulls, without waiting on anyone (with backpressure: a worker whose last pull
of a kind has not run yet is left out)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from lsgd_ray._internal.group_repair import GroupRepair
from lsgd_ray._internal.protocol import WorkerSpec
from lsgd_ray.algorithms.lsgd import crossed, select_leader


class AsyncGroup(GroupRepair):
    """The asynchronous mode of ``LocalLeader``, which sets this state up."""

    spec: WorkerSpec
    estimates: list[float]
    leader_index: int
    pulls_skipped: dict[str, int]
    _lock: threading.Lock
    _resetting: set[int]  # resets sent, not yet seen to take effect
    _diverged: set[int]  # workers whose last report was not finite
    _async_args: tuple
    _reset_diverged_async: bool
    _group_steps: int
    _global_leader: Any
    _lam: float
    _local_period: int

    def start_async(
        self,
        global_leader: Any,
        lam: float,
        tau: int,
        report_every: int,
        max_steps: int | None,
        exchange: Any = None,
    ) -> list[ray.ObjectRef]:
        """Start every worker's own training loop; returns their result references.
        ``exchange``: a peer's per-step schedule (EASGD, DOWNPOUR), handed to every worker;
        the peers keep their own rules, so only LSGD (no exchange) resets diverged workers."""
        self._global_leader, self._lam = global_leader, lam
        self._reset_diverged_async = exchange is None
        self._diverged = set()
        self._local_period = tau * len(self.workers)  # l·τ steps summed over the group
        self._group_steps = 0
        handle = ray.get_runtime_context().current_actor
        self._async_args = (handle, report_every, max_steps, exchange)
        return [w.run_async.remote(*self._async_args) for w in self.workers]

    def replace_async(
        self, rank: int, reason: str, source: list[ray.ObjectRef | None], origin: str = "the leader's weights"
    ) -> list[Any]:
        """Asynchronous mode: replace a dead worker and start its loop again; returns
        ``[new loop ref, new handle]`` (wrapped, so the caller gets the reference itself)."""
        index = self.ranks.index(rank)
        with self._lock:
            self._diverged.discard(index)
        steps = max((s["steps"] for s in self._alive_stats()), default=None)
        self.replace_worker(index, reason, source, steps, origin)
        return [self.workers[index].run_async.remote(*self._async_args), self.workers[index]]

    def _alive_stats(self) -> list[dict[str, Any]]:
        stats = []
        for w in self.workers:
            with contextlib.suppress(RayActorError, GetTimeoutError):
                stats.append(ray.get(w.stats.remote(), timeout=self.timeout_s))
        return stats

    def report(self, index: int, steps: int, estimate: float) -> None:
        """A worker took ``steps`` more steps; pull the group toward its leader when due.

        LSGD: a worker whose last report was not finite is reset to the leader's weights as soon
        as the group has a finite leader, whoever's report shows it: the diverged worker's own
        last report may come before any other worker's first (it may even have finished)."""
        with self._lock:
            self.estimates[index] = estimate
            if math.isfinite(estimate):
                self._resetting.discard(index)
                self._diverged.discard(index)
            elif self._reset_diverged_async:
                self._diverged.add(index)
            before = self._group_steps
            self._group_steps += steps
            leader = select_leader(self.estimates)
            due = (
                self._lam > 0
                and (len(self.workers) > 1 or self.spec.lsgd.proximal > 0)
                and leader >= 0
                and crossed(before, self._group_steps, self._local_period)
            )
            self.leader_index = leader
            resets = sorted(self._diverged - self._resetting) if leader >= 0 else []
            self._resetting.update(resets)
        if resets:  # each applies it between two of its steps (or at once if its loop has ended)
            snapshot = self.workers[leader].get_weights.remote(count=False)
            for i in resets:
                self.workers[i].reset_to.remote(snapshot)
                self._reset_event(i, None)
        if due:
            self._pull_each(self.workers[leader].get_weights.remote, self._lam, skip=leader, kind="local")
        if self._global_leader is not None:
            self._global_leader.report.remote(
                self.plan.group,
                steps,
                self.ranks[leader] if leader >= 0 else -1,
                self.estimates[leader] if leader >= 0 else float("inf"),
            )

    def async_pull(self, wrapped_ref: list[ray.ObjectRef], strength: float, skip_rank: int) -> None:
        """Asynchronous global pull: forward the reference without waiting on anyone."""
        skip = self._index_of(skip_rank)
        self._pull_each(lambda: wrapped_ref[0], strength, skip=-1 if skip is None else skip, kind="global")

    def _pull_each(self, snapshot: Callable[[], ray.ObjectRef], strength: float, skip: int, kind: str) -> None:
        """Asynchronous mode: every worker but ``skip`` queues a pull toward ``snapshot()``
        (taken only if some worker gets it); nobody waits. With the proximal pull ``skip`` (the
        leader) is sent its own snapshot too, with strength 0: its target for the per-step pull.

        Backpressure: a worker whose previous pull of this ``kind`` has not run yet is left
        out (counted in ``pulls_skipped``). Each queued pull pins its snapshot in the object
        store, and the worker only applies the newest one of each kind anyway, so on a loaded
        machine queued pulls would pile up snapshots faster than anyone uses them."""
        with self._pull_lock:
            refresh = self.spec.lsgd.proximal > 0
            others = [i for i in range(len(self.workers)) if i != skip or refresh]
            previous = [self._in_flight[(i, kind)] for i in others if (i, kind) in self._in_flight]
            running = ray.wait(previous, num_returns=len(previous), timeout=0)[1] if previous else []
            targets = [i for i in others if self._in_flight.get((i, kind)) not in running]
            self.pulls_skipped[kind] += len(others) - len(targets)
            if not targets:
                return
            ref = snapshot()
            for i in targets:
                pull = self.workers[i].pull.remote(ref, 0.0 if i == skip else strength, inspect=False, kind=kind)
                self._in_flight[(i, kind)] = pull
