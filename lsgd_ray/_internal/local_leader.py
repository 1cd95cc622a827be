"""LocalLeader: one per group, pinned to its node; creates its workers on that same node.

Every local period it picks the group's best worker, has that worker publish its flat weights
once to the object store, and sends every other worker of the group the *reference*: each reads
the same shared memory. It forwards global-leader references the same way. It never holds
weights itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.protocol import (
    Failure,
    FailureKind,
    WorkerSpec,
    actor_class,
    actor_log,
    node_id,
    node_ip,
)
from lsgd_ray._internal.waiting import get_all, startup_timeout
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms.lsgd import crossed, select_leader, weighted_mean
from lsgd_ray.topology import GroupPlan, node_with_room, nodes_from_ray, worker_resources

LEADER_CONCURRENCY = 16  # leaders answer reports, pulls and status queries concurrently

WORKER_CONCURRENCY = 8  # async: training loop + queued pulls, weight requests, stop, stats


@dataclass(frozen=True)
class LocalLeaderFactory:
    """Creates a group's LocalLeader pinned to its node: the Trainer's first ones, and the
    GlobalLeader's replacement when one dies."""

    spec: WorkerSpec
    model_factory: Any
    dataset_factory: Any
    optimizer_factory: Any
    worker_cls: type
    timeout_s: float

    def __call__(self, plan: GroupPlan) -> Any:
        pinned = NodeAffinitySchedulingStrategy(plan.node_id, soft=False)
        actor = actor_class(LocalLeader, num_cpus=0, max_concurrency=LEADER_CONCURRENCY, scheduling_strategy=pinned)
        return actor.remote(
            plan,
            self.spec,
            self.model_factory,
            self.dataset_factory,
            self.optimizer_factory,
            self.worker_cls,
            self.timeout_s,
        )

    def placed(self, plan: GroupPlan) -> GroupPlan | None:
        """Where a group whose LocalLeader died can start again: ``plan`` if its node is alive,
        else ``plan`` moved to the first live node with the free resources for its workers now
        (``None``: there is none)."""
        nodes = nodes_from_ray(ray.nodes())
        if plan.node_id in {n.node_id for n in nodes}:
            return plan
        from ray._private.state import available_resources_per_node  # private, as in Trainer.start

        needs = worker_resources(self.spec.cpus, self.spec.gpus)
        node = node_with_room(nodes, available_resources_per_node(), needs, plan.num_workers)
        return None if node is None else dataclasses.replace(plan, node_id=node)


class LocalLeader:
    def __init__(
        self,
        plan: GroupPlan,
        spec: WorkerSpec,
        model_factory: Any,
        dataset_factory: Any,
        optimizer_factory: Any = None,
        worker_cls: type = Worker,
        timeout_s: float = 120.0,
    ) -> None:
        self.plan, self.spec, self.timeout_s = plan, spec, timeout_s
        self.log = actor_log(f"LocalLeader {plan.group}")
        pinned = NodeAffinitySchedulingStrategy(node_id=plan.node_id, soft=False)
        remote_cls = actor_class(
            worker_cls,
            num_cpus=spec.cpus,
            num_gpus=spec.gpus,
            max_concurrency=WORKER_CONCURRENCY,
            scheduling_strategy=pinned,
        )
        self._spawn = lambda index, rank: remote_cls.remote(
            rank, plan.group, index, model_factory, dataset_factory, spec, optimizer_factory
        )
        self.ranks = list(plan.ranks)
        self.workers = [self._spawn(index, rank) for index, rank in enumerate(self.ranks)]
        self.events: list[dict[str, Any]] = []  # workers replaced or reset, for the result
        self._resetting: set[int] = set()  # async: resets sent, not yet seen to take effect
        self._async_args: tuple = ()
        self._reset_diverged_async = False
        self._busy = threading.Lock()  # held by synchronous rounds and calls; settle() waits for it
        self.estimates = [float("inf")] * len(self.workers)
        self.leader_index = 0
        # asynchronous state
        self._lock = threading.Lock()
        self._group_steps = 0
        self._global_leader: Any = None
        self._lam = 0.0
        self._local_period = 0
        self._pending_local: tuple[ray.ObjectRef, float, int] | None = None
        # backpressure: each worker's last pull of each kind, and the pulls left out meanwhile
        self._pull_lock = threading.Lock()
        self._in_flight: dict[tuple[int, str], ray.ObjectRef] = {}
        self.pulls_skipped = {"local": 0, "global": 0}

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"LocalLeader(group={self.plan.group})"

    def ready(self) -> dict[str, Any]:
        infos = get_all(
            [w.ready.remote() for w in self.workers],
            startup_timeout(self.timeout_s),
            [f"worker {r} (group {self.plan.group})" for r in self.ranks],
            hint="its node may lack the resources it asked for, or its model/dataset factory failed",
        )
        here = {"node_id": node_id(), "node_ip": node_ip(), "pid": os.getpid()}
        return {"group": self.plan.group, **here, "workers": infos}

    def worker_handles(self) -> list[Any]:
        return list(self.workers)

    def _names(self) -> list[str]:
        return [f"worker {r} (group {self.plan.group})" for r in self.ranks]

    # ------------------------------------------------------------------ synchronous rounds
    #
    # A pull decided in round r travels with round r+1's ``train`` call (or with ``flush``):
    # nothing happens to a worker between the two, so the arithmetic is the same, and a round
    # costs one call per worker instead of three.

    def train_round(
        self,
        num_steps: int,
        local_pull: bool,
        lam: float,
        publish: bool,
        global_pull: list[ray.ObjectRef] | None = None,
        lam_global: float = 0.0,
        global_rank: int = -1,
    ) -> dict[str, Any]:
        """Apply pending pulls and train every worker ``num_steps`` steps; pick the group leader.

        With ``publish`` the group leader's weights go to the object store once; the reference
        is returned wrapped in a list (so Ray passes it on unresolved) and, with
        ``local_pull``, the group pulls toward it at the start of the next call.
        """
        with self._busy:
            return self._train_round(num_steps, local_pull, lam, publish, global_pull, lam_global, global_rank)

    def _train_round(
        self,
        num_steps: int,
        local_pull: bool,
        lam: float,
        publish: bool,
        global_pull: list[ray.ObjectRef] | None,
        lam_global: float,
        global_rank: int,
    ) -> dict[str, Any]:
        pulls = [self._pulls_for(i, global_pull, lam_global, global_rank) for i in range(len(self.workers))]
        calls = [w.train.remote(num_steps, *p) for w, p in zip(self.workers, pulls)]
        local_leader = self._pending_local[2] if self._pending_local else None
        self._pending_local = None
        results, failures = self._gather(calls)
        failures = self._waiting_on_inputs(failures, pulls, (local_leader, self._index_of(global_rank)))
        failed = [f for f in failures if f.kind is not FailureKind.LOST_INPUT]
        lost = [f.rank for f in failures if f.kind is FailureKind.LOST_INPUT]
        if lost:  # a pull's weights were lost with (or are held by) a failed worker: train without it
            for f in failed:  # a hung one's stuck calls end when it does
                with contextlib.suppress(Exception):
                    ray.kill(self.workers[f.rank])
            again, still = self._gather([self.workers[i].train.remote(num_steps) for i in lost])
            for i, result in zip(lost, again):
                results[i] = result
            failed += [dataclasses.replace(f, rank=lost[f.rank]) for f in still]
        self.estimates = [r["estimate"] if r else math.inf for r in results]
        leader = select_leader(self.estimates)
        self.leader_index = leader
        steps = max((r["steps"] for r in results if r), default=None)
        diverged = [i for i, r in enumerate(results) if r and not math.isfinite(r["estimate"]) and i != leader]
        if failed or diverged:  # only then: a snapshot of the leader's weights to restart from
            source = self._weights_source(leader, global_pull)
            for f in failed:
                self.replace_worker(f.rank, f.reason, [source], steps)
            self._reset_diverged(diverged, source, steps)
        results = [r or {"compute_s": 0.0} for r in results]
        leader_ref = None
        if publish and leader >= 0:
            leader_ref = self.workers[leader].get_weights.remote()
            if local_pull and lam > 0 and len(self.workers) > 1:
                self._pending_local = (leader_ref, lam, leader)
        return {
            "group": self.plan.group,
            "estimates": self.estimates,
            "leader": self.ranks[leader] if leader >= 0 else -1,
            "leader_estimate": self.estimates[leader] if leader >= 0 else float("inf"),
            "leader_ref": [leader_ref],
            "compute_s": [r["compute_s"] for r in results],
            "events": self.take_events(),
        }

    # ------------------------------------------------------------------ failures

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
                if isinstance(exc, RayActorError):  # RayTaskError(ActorDiedError): an argument's producer died
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

    def _weights_source(self, leader: int, global_pull: list[ray.ObjectRef] | None) -> ray.ObjectRef | None:
        """Where a replaced or diverged worker restarts from: the group leader's weights, or
        the global leader's when the group has no usable worker."""
        if leader >= 0:
            return self.workers[leader].get_weights.remote(False)
        return global_pull[0] if global_pull else None

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
        name = f"worker {self.ranks[index]} (group {self.plan.group})"
        info = get_all([new.ready.remote()], startup_timeout(self.timeout_s), [f"replacement {name}"])[0]
        try:
            if source and source[0] is not None:
                get_all([new.reset_to.remote(source[0], steps)], self.timeout_s, [f"replacement {name}"])
        except RayTaskError:  # the leader's weights were lost too: start from the initial weights
            source = [None]
            origin = "the initial weights"
        if not source or source[0] is None:
            get_all([new.reset_to.remote(None, steps)], self.timeout_s, [f"replacement {name}"])
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

    def settle(self) -> None:
        """Wait for a round still running (its coordinator died) and drop what it left pending."""
        with self._busy:
            self._pending_local = None

    def reset_workers(self, source: list[ray.ObjectRef | None], steps: int | None) -> None:
        """Start every worker of this (re-formed) group from ``source`` at ``steps``."""
        get_all([w.reset_to.remote(source[0], steps) for w in self.workers], self.timeout_s, self._names())

    def take_events(self) -> list[dict[str, Any]]:
        """The events since the last call (the coordinator collects them)."""
        events, self.events = self.events, []
        return events

    def _pulls_for(
        self, index: int, global_pull: list[ray.ObjectRef] | None, lam_global: float, global_rank: int
    ) -> tuple[Any, float, Any, float]:
        """(local ref, strength, global ref, strength) for worker ``index``; a leader gets its own
        reference with strength 0, which orders its snapshot before its next step."""
        local_ref, local_strength = None, 0.0
        if self._pending_local is not None:
            local_ref, lam, leader = self._pending_local
            local_strength = 0.0 if index == leader else lam
        global_ref, global_strength = None, 0.0
        if global_pull and global_pull[0] is not None:
            global_ref = global_pull[0]
            global_strength = 0.0 if self.ranks[index] == global_rank else lam_global
        return local_ref, local_strength, global_ref, global_strength

    def flush(
        self, global_pull: list[ray.ObjectRef] | None = None, lam_global: float = 0.0, global_rank: int = -1
    ) -> None:
        """Apply the pulls still pending from the last round, so every worker's weights are current."""
        with self._busy:
            self._flush(global_pull, lam_global, global_rank)

    def _flush(self, global_pull: list[ray.ObjectRef] | None, lam_global: float, global_rank: int) -> None:
        calls = [
            w.apply_pulls.remote(*self._pulls_for(i, global_pull, lam_global, global_rank))
            for i, w in enumerate(self.workers)
        ]
        self._pending_local = None
        get_all(calls, self.timeout_s, self._names())

    def _pull_each(self, snapshot: Callable[[], ray.ObjectRef], strength: float, skip: int, kind: str) -> None:
        """Asynchronous mode: every worker but ``skip`` queues a pull toward ``snapshot()``
        (taken only if some worker gets it); nobody waits.

        Backpressure: a worker whose previous pull of this ``kind`` has not run yet is left
        out (counted in ``pulls_skipped``). Each queued pull pins its snapshot in the object
        store, and the worker only applies the newest one of each kind anyway, so on a loaded
        machine queued pulls would pile up snapshots faster than anyone uses them."""
        with self._pull_lock:
            others = [i for i in range(len(self.workers)) if i != skip]
            previous = [self._in_flight[(i, kind)] for i in others if (i, kind) in self._in_flight]
            running = ray.wait(previous, num_returns=len(previous), timeout=0)[1] if previous else []
            targets = [i for i in others if self._in_flight.get((i, kind)) not in running]
            self.pulls_skipped[kind] += len(others) - len(targets)
            if not targets:
                return
            ref = snapshot()
            for i in targets:
                self._in_flight[(i, kind)] = self.workers[i].pull.remote(ref, strength, False, kind)

    # ------------------------------------------------------------------ the peers' rounds

    def call_workers(
        self,
        method: str,
        args: list[tuple],
        num_returns: int = 1,
        indexes: list[int] | None = None,
        collective: bool = False,
    ) -> dict[str, Any]:
        """Call ``method`` on every worker (or those at ``indexes``) with its own ``args``
        (started together, then one wait). Object references in ``args`` reach the workers as
        top-level arguments, so each worker reads them straight from its node's object store.
        With ``num_returns=2`` the second returns (published weights) come back as wrapped
        references, never fetched here. A worker that died, hung or lost an input gets a ``None``
        result and a ``Failure`` (by global rank) under ``failures``: the coordinator decides,
        since only it knows the algorithm's weights to restart from. ``collective``: a survivor
        whose collective failed with a dead peer is reported too (``BROKEN``)."""
        with self._busy:  # a new coordinator's settle() waits for a dead one's round
            return self._call_workers(method, args, num_returns, indexes, collective)

    def _call_workers(
        self, method: str, args: list[tuple], num_returns: int, indexes: list[int] | None, collective: bool
    ) -> dict[str, Any]:
        indexes = list(range(len(self.workers))) if indexes is None else list(indexes)
        calls = [
            getattr(self.workers[i], method).options(num_returns=num_returns).remote(*a) for i, a in zip(indexes, args)
        ]
        firsts = calls if num_returns == 1 else [c[0] for c in calls]
        # a survivor's collective gives up within the gloo timeout (actor_timeout_s) after a
        # peer dies mid-call: wait that out too, so it is not taken for hung and killed
        timeout = 2 * self.timeout_s if collective else self.timeout_s
        results, failures = self._gather(firsts, timeout, collective)
        refs = [] if num_returns == 1 else [[c[1]] for c in calls]
        return {
            "group": self.plan.group,
            "results": results,
            "refs": refs,
            "failures": [dataclasses.replace(f, rank=self.ranks[indexes[f.rank]]) for f in failures],
        }

    # ------------------------------------------------------------------ asynchronous mode

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
        """A worker took ``steps`` more steps; pull the group toward its leader when due."""
        reset = None
        with self._lock:
            self.estimates[index] = estimate
            if math.isfinite(estimate):
                self._resetting.discard(index)
            before = self._group_steps
            self._group_steps += steps
            leader = select_leader(self.estimates)
            due = (
                self._lam > 0
                and len(self.workers) > 1
                and leader >= 0
                and crossed(before, self._group_steps, self._local_period)
            )
            self.leader_index = leader
            diverged = self._reset_diverged_async and not math.isfinite(estimate)
            if diverged and leader >= 0 and index != leader and index not in self._resetting:
                self._resetting.add(index)
                reset = leader
        if reset is not None:  # the worker applies it between two of its steps
            self.workers[index].reset_to.remote(self.workers[reset].get_weights.remote(False))
            self._reset_event(index, None)
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
        skip = self.ranks.index(skip_rank) if skip_rank in self.ranks else -1
        self._pull_each(lambda: wrapped_ref[0], strength, skip=skip, kind="global")

    # ------------------------------------------------------------------ evaluation

    def group_mean(self) -> dict[str, Any]:
        """The mean of this group's workers' weights, put once in the object store (wrapped, so
        the GlobalLeader gets the reference) with the number of workers it averages. The
        workers' arrays are read-only views of this node's shared memory, summed into one
        buffer; in asynchronous mode each worker takes its snapshot between two steps, as for
        ``GlobalLeader.leader_weights``. A worker that died or hangs fails the call."""
        arrays = get_all([w.get_weights.remote(False) for w in self.workers], self.timeout_s, self._names())
        mean = weighted_mean(arrays, [1] * len(arrays))
        return {"group": self.plan.group, "mean": [ray.put(mean)], "count": len(arrays)}

    def status(self) -> dict[str, Any]:
        """The events since the last call and the pulls left out so far (backpressure)."""
        return {"events": self.take_events(), "pulls_skipped": dict(self.pulls_skipped)}
