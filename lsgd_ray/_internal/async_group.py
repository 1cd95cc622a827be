"""A LocalLeader in asynchronous mode: its workers run their own loops and report every few
steps; it pulls the group toward its leader every l·τ steps summed over the group and forwards
the global leader's pulls, without waiting on anyone (with backpressure: a worker whose last pull
of a kind has not run yet is left out). A worker whose loop runs but that has not reported for
``actor_timeout_s`` is hung: it is killed, so its loop ends as a dead one's and is restarted
like it, under the reason "hung"."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from lsgd_ray._internal.group_repair import GroupRepair
from lsgd_ray._internal.protocol import Failure, FailureKind, WorkerSpec
from lsgd_ray._internal.waiting import MARGIN_S
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
    _loops: list[ray.ObjectRef]  # each worker's loop, by index in the group
    _loop_args: list[tuple]  # the ``_async_args`` each loop was started with (its exchange's server)
    _heard: list[float]  # time.monotonic() each worker last reported (or its loop started)
    _hung: dict[int, str]  # workers killed as hung, by index: the reason their replacement gets
    _loop_start: list[int | ray.ObjectRef]  # each worker's step count as its loop started (or its stats())
    _reported: list[int]  # the steps each worker reported since its loop started
    _watchdog: threading.Thread | None

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
        counts = [w.stats.remote() for w in self.workers]  # read only if one dies alone (_steps_reached)
        loops = [w.run_async.remote(*self._async_args) for w in self.workers]
        with self._lock:  # a first step may be slow (imports, warm-up): a margin before the first report
            self._loops, self._heard = list(loops), [time.monotonic() + MARGIN_S] * len(loops)
            self._loop_args = [self._async_args] * len(loops)
            self._loop_start, self._reported = list(counts), [0] * len(loops)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch_for_hangs, daemon=True, name="hang watchdog")
            self._watchdog.start()
        return loops

    def _watch_for_hangs(self) -> None:
        """Asynchronous mode, on a thread of its own: a worker whose loop has not ended and that
        has not reported for ``timeout_s`` is killed (its loop ends; whoever waits on it restarts
        it as a dead one's, and ``replace_async`` names the hang as the reason)."""
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                silent = [i for i, heard in enumerate(self._heard) if now - heard > self.timeout_s]
                loops = {i: self._loops[i] for i in silent}
            running = set(ray.wait(list(loops.values()), num_returns=len(loops), timeout=0)[1]) if loops else set()
            for i, loop in loops.items():
                if loop not in running:
                    continue  # its loop ended: it has nothing to report
                failure = Failure(self.ranks[i], FailureKind.HUNG, f"{self.timeout_s:g}s")
                with self._lock:
                    self._hung[i] = failure.reason
                    self._heard[i] = math.inf  # until its replacement starts
                self.log.warning(f"worker {self.ranks[i]}: no report within {self.timeout_s:g}s (hung): killed")
                with contextlib.suppress(Exception):
                    ray.kill(self.workers[i])

    def replace_async(
        self, rank: int, reason: str, source: list[ray.ObjectRef | None], origin: str = "the leader's weights"
    ) -> list[Any]:
        """Asynchronous mode: replace a dead worker and start its loop again; returns
        ``[new loop ref, new handle]`` (wrapped, so the caller gets the reference itself).
        The replacement starts at the group's highest step count, or, with no other worker
        alive, at the count the dead one reached: never back at 0, which would make it train
        a whole budget again and take the run's checkpoint step (the slowest worker's) back."""
        index = self.ranks.index(rank)
        with self._lock:
            self._diverged.discard(index)
            reason = self._hung.pop(index, reason)
        alive = [s["steps"] for s in self._alive_stats()]
        steps = max(alive) if alive else self._steps_reached(index)
        self.replace_worker(index, reason, source, steps, origin)
        loop = self.workers[index].run_async.remote(*self._async_args)
        with self._lock:
            self._loops[index], self._heard[index] = loop, time.monotonic() + MARGIN_S
            self._loop_args[index] = self._async_args
            self._loop_start[index], self._reported[index] = steps or 0, 0
        return [loop, self.workers[index]]

    def _steps_reached(self, index: int) -> int | None:
        """Worker ``index``'s step count: where its loop started plus the steps it reported since
        (a step or two more if its ``stats()`` answered after its loop began); ``None`` if it
        died before saying where it started."""
        with self._lock:
            start, reported = self._loop_start[index], self._reported[index]
        if isinstance(start, ray.ObjectRef):
            try:
                start = ray.get(start, timeout=0)["steps"]
            except (ray.exceptions.RayError, KeyError, TypeError):  # died first, or not answered yet
                return None
        return start + reported

    def use_exchange(self, exchange: Any) -> None:
        """Asynchronous peers: the exchange the loops started from now on get (its coordinator
        replaced a lost ParameterServer)."""
        self._async_args = (*self._async_args[:-1], exchange)

    def restart_loop(self, rank: int, same_server: bool = False) -> list[ray.ObjectRef | None]:
        """Asynchronous mode: start the loop of worker ``rank`` again, on its own process and
        from its own weights: it ended when the ParameterServer it exchanged with died, or
        (``same_server``) gave up waiting on one that was only busy. Returns ``[new loop ref]``
        (wrapped, as ``replace_async``), or ``[None]`` if that loop had the server in use now
        and not ``same_server`` (not a lost one: what failed it is not for a restart to mend).
        A worker dead meanwhile gets a loop that fails at once, and is replaced as a dead one's."""
        index = self.ranks.index(rank)
        with self._lock:
            if self._loop_args[index] is self._async_args and not same_server:
                return [None]
        loop = self.workers[index].run_async.remote(*self._async_args)
        with self._lock:
            self._loops[index], self._heard[index] = loop, time.monotonic() + MARGIN_S
            self._loop_args[index] = self._async_args
        return [loop]

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
            self._heard[index] = time.monotonic()
            self.estimates[index] = estimate
            if math.isfinite(estimate):
                self._resetting.discard(index)
                self._diverged.discard(index)
            elif self._reset_diverged_async:
                self._diverged.add(index)
            before = self._group_steps
            self._group_steps += steps
            self._reported[index] += steps
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
