"""LocalLeader: one per group, pinned to its node; creates its workers on that same node.

Every local period it picks the group's best worker, has that worker publish its flat weights
once to the object store, and sends every other worker of the group the *reference*: each reads
the same shared memory. It forwards global-leader references the same way. It never holds
weights itself.

This module holds the synchronous rounds, the peers' calls and the group mean; the
asynchronous mode is in ``async_group.py``, the repair of a group's failed workers in
``group_repair.py`` (both bases of ``LocalLeader``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.async_group import AsyncGroup
from lsgd_ray._internal.protocol import (
    FailureKind,
    GroupCall,
    GroupRound,
    Unopened,
    WorkerSpec,
    actor_class,
    actor_log,
    event_key,
    node_id,
    node_ip,
)
from lsgd_ray._internal.waiting import Deadlines, answers, get_all
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms.lsgd import select_leader, weighted_mean
from lsgd_ray.topology import GroupPlan, node_with_room, nodes_from_ray, worker_resources

LEADER_CONCURRENCY = 16  # leaders answer reports, pulls and status queries concurrently

WORKER_CONCURRENCY = 8  # async: training loop + queued pulls, weight requests, stop, stats


@dataclass(frozen=True)
class LocalLeaderFactory:
    """Creates a group's LocalLeader pinned to its node: the Trainer's first ones, and the
    GlobalLeader's replacement when one dies."""

    spec: WorkerSpec
    model_factory: Unopened
    dataset_factory: Unopened
    optimizer_factory: Unopened  # may hold None: then the spec's optimizer
    worker_cls: type
    timeout_s: float

    def __call__(self, plan: GroupPlan, checkpoint: str | None = None) -> Any:
        """A new LocalLeader for ``plan``; ``checkpoint``: the run's newest (``note_checkpoint``)."""
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
            checkpoint,
        )

    def placed(self, plan: GroupPlan, plans: list[GroupPlan]) -> GroupPlan | None:
        """Where a group whose LocalLeader died can start again: ``plan`` if its node is alive,
        else ``plan`` moved to the first live node with room for its workers now beyond those
        of the run's other ``plans`` there (``None``: there is none). A worker of theirs that
        just died has freed its resources, but its replacement is coming: a chaos run put a
        lost group on such a node, and the replacement then waited forever to be placed."""
        nodes = nodes_from_ray(ray.nodes())
        if plan.node_id in {n.node_id for n in nodes}:
            return plan
        from ray._private.state import available_resources_per_node  # private, as in driver.placement

        needs = worker_resources(self.spec.cpus, self.spec.gpus)
        planned = Counter[str]()
        for other in plans:
            if other.group != plan.group:
                planned[other.node_id] += other.num_workers
        node = node_with_room(nodes, available_resources_per_node(), needs, plan.num_workers, planned)
        return None if node is None else dataclasses.replace(plan, node_id=node)


class LocalLeader(AsyncGroup):
    def __init__(
        self,
        plan: GroupPlan,
        spec: WorkerSpec,
        model_factory: Unopened,
        dataset_factory: Unopened,
        optimizer_factory: Unopened,
        worker_cls: type = Worker,
        timeout_s: float = 120.0,
        checkpoint: str | None = None,
    ) -> None:
        self.plan, self.spec, self.timeout_s = plan, spec, timeout_s
        self.last_checkpoint = checkpoint
        self.deadlines = Deadlines(timeout_s)
        self.log = actor_log(f"LocalLeader {plan.group}")
        pinned = NodeAffinitySchedulingStrategy(node_id=plan.node_id, soft=False)
        remote_cls = actor_class(
            worker_cls,
            num_cpus=spec.cpus,
            num_gpus=spec.gpus,
            max_concurrency=WORKER_CONCURRENCY,
            scheduling_strategy=pinned,
        )
        self._spawn = lambda index, rank: remote_cls.remote(  # the factories resolved in the Worker only
            rank, plan.group, index, model_factory.ref, dataset_factory.ref, spec, optimizer_factory.ref
        )
        self.ranks = list(plan.ranks)
        self.workers = [self._spawn(index, rank) for index, rank in enumerate(self.ranks)]
        self.events: list[dict[str, Any]] = []  # workers replaced or reset, for the result
        self._handed: list[dict[str, Any]] = []  # events taken by a coordinator (events_not_in)
        self._resetting: set[int] = set()  # async: resets sent, not yet seen to take effect
        self._async_args: tuple = ()
        self._reset_diverged_async = False
        self._busy = threading.Lock()  # held by synchronous rounds and calls; settle() waits for it
        self.estimates = [float("inf")] * len(self.workers)
        self.leader_index = 0
        self.steps: int | None = None  # the group's step count after its last round
        self._last_global: list[ray.ObjectRef | None] = [None]
        self._last_published: list[ray.ObjectRef | None] = [None]
        # asynchronous state
        self._lock = threading.Lock()
        self._group_steps = 0
        self._global_leader: Any = None
        self._lam = 0.0
        self._local_period = 0
        self._pending_local: tuple[ray.ObjectRef, float, int] | None = None
        self._loops: list[ray.ObjectRef] = []
        self._loop_args: list[tuple] = []
        self._heard: list[float] = []
        self._hung: dict[int, str] = {}
        self._loop_start: list[int | ray.ObjectRef] = []
        self._reported: list[int] = []
        self._watchdog: threading.Thread | None = None
        # backpressure: each worker's last pull of each kind, and the pulls left out meanwhile
        self._pull_lock = threading.Lock()
        self._in_flight: dict[tuple[int, str], ray.ObjectRef] = {}
        self.pulls_skipped = {"local": 0, "global": 0}

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"LocalLeader(group={self.plan.group})"

    def ready(self) -> dict[str, Any]:
        infos = get_all(
            [w.ready.remote() for w in self.workers],
            self.deadlines.start_s,
            self._names(),
            hint="its node may lack the resources it asked for, or its model/dataset factory failed",
        )
        here = {"node_id": node_id(), "node_ip": node_ip(), "pid": os.getpid()}
        return {"group": self.plan.group, **here, "workers": infos}

    def worker_handles(self) -> list[Any]:
        return list(self.workers)

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
    ) -> GroupRound:
        """Apply pending pulls and train every worker ``num_steps`` steps; pick the group leader.

        With ``publish`` the group leader's weights go to the object store once; the reply
        carries the reference (Ray passes it on unresolved) and, with
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
    ) -> GroupRound:
        if global_pull and global_pull[0] is not None:  # kept: a group with no usable worker restarts from it
            self._last_global = [global_pull[0]]
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
        self.steps = steps if steps is not None else self.steps
        diverged = [i for i, r in enumerate(results) if r and not math.isfinite(r["estimate"]) and i != leader]
        if failed or diverged:  # only then: a snapshot of the leader's weights to restart from
            source, origin = self._weights_source(leader, global_pull)
            steps = steps if steps is not None else self.steps  # none answered: as after the last round
            for f in failed:
                self.replace_worker(f.rank, f.reason, [source], steps, origin)
            self._reset_diverged(diverged, source, steps)
        results = [r or {"compute_s": 0.0} for r in results]
        leader_ref = None
        if publish and leader >= 0:
            leader_ref = self.workers[leader].get_weights.remote()
            self._last_published = [leader_ref]
            if local_pull and lam > 0 and (len(self.workers) > 1 or self.spec.lsgd.proximal > 0):
                self._pending_local = (leader_ref, lam, leader)
        return GroupRound(
            group=self.plan.group,
            estimates=list(self.estimates),
            leader=self.ranks[leader] if leader >= 0 else -1,
            leader_estimate=self.estimates[leader] if leader >= 0 else float("inf"),
            leader_ref=leader_ref,
            compute_s=[r["compute_s"] for r in results],
            events=self.take_events(),
        )

    def settle(self) -> None:
        """Wait for a round still running (its coordinator died) and drop what it left pending."""
        with self._busy:
            self._pending_local = None

    def take_events(self) -> list[dict[str, Any]]:
        """The events since the last call (the coordinator collects them)."""
        events, self.events = self.events, []
        self._handed.extend(events)
        return events

    def events_not_in(self, known: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The events taken earlier whose ``event_key`` is not in ``known``: after a coordinator
        died, those it took but the driver never saw (a few per failure, kept for this)."""
        seen = set(known)
        return [e for e in self._handed if event_key(e) not in seen]

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
        _, failures = self._gather(calls)
        failed = [f for f in failures if f.kind is not FailureKind.LOST_INPUT]  # lost input: it goes on without
        if failed:  # replaced now, from a live worker of this group (or the global leader's weights)
            down = {f.rank for f in failed}
            live = [i for i in range(len(self.workers)) if i not in down]
            leader = self.leader_index if self.leader_index in live else next(iter(live), -1)
            source, origin = self._weights_source(leader, global_pull)
            for f in failed:
                self.replace_worker(f.rank, f.reason, [source], self.steps, origin)

    # ------------------------------------------------------------------ the peers' rounds

    def call_workers(
        self,
        method: str,
        args: list[tuple],
        num_returns: int = 1,
        indexes: list[int] | None = None,
        collective: bool = False,
    ) -> GroupCall:
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
    ) -> GroupCall:
        indexes = list(range(len(self.workers))) if indexes is None else list(indexes)
        calls = [
            getattr(self.workers[i], method).options(num_returns=num_returns).remote(*a) for i, a in zip(indexes, args)
        ]
        firsts = calls if num_returns == 1 else [c[0] for c in calls]
        # a survivor's collective gives up within the gloo timeout (actor_timeout_s) after a
        # peer dies mid-call: wait that out too, so it is not taken for hung and killed
        timeout = self.deadlines.collective_s if collective else self.deadlines.call_s
        results, failures = self._gather(firsts, timeout, collective)
        refs = [] if num_returns == 1 else [[c[1]] for c in calls]
        return GroupCall(
            group=self.plan.group,
            results=results,
            refs=refs,
            failures=[dataclasses.replace(f, rank=self.ranks[indexes[f.rank]]) for f in failures],
        )

    # ------------------------------------------------------------------ evaluation

    def group_mean(self) -> dict[str, Any]:
        """The mean of this group's workers' weights, put once in the object store (wrapped, so
        the GlobalLeader gets the reference) with the number of workers it averages. The
        workers' arrays are read-only views of this node's shared memory, summed into one
        buffer; in asynchronous mode each worker takes its snapshot between two steps, as for
        ``GlobalLeader.leader_weights``. A worker that died or hangs at this moment is left out
        (and replaced at the next round); with none left the mean is ``[None]`` with count 0."""
        replies = answers([w.get_weights.remote(count=False) for w in self.workers], self.timeout_s)
        arrays = [array for array in replies if array is not None]
        if not arrays:
            return {"group": self.plan.group, "mean": [None], "count": 0}
        mean = weighted_mean(arrays, [1] * len(arrays))
        return {"group": self.plan.group, "mean": [ray.put(mean)], "count": len(arrays)}

    def status(self) -> dict[str, Any]:
        """The events since the last call and the pulls left out so far (backpressure)."""
        return {"events": self.take_events(), "pulls_skipped": dict(self.pulls_skipped)}
