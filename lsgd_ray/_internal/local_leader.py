"""LocalLeader: one per group, pinned to its node; creates its workers on that same node.

Every local period it picks the group's best worker, has that worker publish its flat weights
once to the object store, and sends every other worker of the group the *reference*: each reads
the same shared memory. It forwards global-leader references the same way. It never holds
weights itself.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.waiting import get_all
from lsgd_ray._internal.worker import Worker, WorkerSpec, node_id
from lsgd_ray.algorithms.lsgd import crossed, select_leader
from lsgd_ray.topology import GroupPlan

WORKER_CONCURRENCY = 8  # async: training loop + queued pulls, weight requests, stop, stats


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
        pinned = NodeAffinitySchedulingStrategy(node_id=plan.node_id, soft=False)
        remote_cls = ray.remote(
            num_cpus=spec.cpus,
            num_gpus=spec.gpus,
            max_concurrency=WORKER_CONCURRENCY,
            scheduling_strategy=pinned,
        )(worker_cls)
        self.workers = [
            remote_cls.remote(rank, plan.group, index, model_factory, dataset_factory, spec, optimizer_factory)
            for index, rank in enumerate(plan.ranks)
        ]
        self.ranks = list(plan.ranks)
        self.estimates = [float("inf")] * len(self.workers)
        self.leader_index = 0
        # asynchronous state
        self._lock = threading.Lock()
        self._group_steps = 0
        self._global_leader: Any = None
        self._lam = 0.0
        self._local_period = 0
        self._pending_local: tuple[ray.ObjectRef, float, int] | None = None

    def ready(self) -> dict[str, Any]:
        infos = get_all(
            [w.ready.remote() for w in self.workers],
            self.timeout_s,
            [f"worker {r} (group {self.plan.group})" for r in self.ranks],
            hint="its node may lack the resources it asked for, or its model/dataset factory failed",
        )
        return {"group": self.plan.group, "node_id": node_id(), "workers": infos}

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
        calls = [
            w.train.remote(num_steps, *self._pulls_for(i, global_pull, lam_global, global_rank))
            for i, w in enumerate(self.workers)
        ]
        self._pending_local = None
        results = get_all(calls, self.timeout_s, self._names())
        self.estimates = [r["estimate"] for r in results]
        leader = select_leader(self.estimates)
        self.leader_index = leader
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
        }

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
        calls = [
            w.apply_pulls.remote(*self._pulls_for(i, global_pull, lam_global, global_rank))
            for i, w in enumerate(self.workers)
        ]
        self._pending_local = None
        get_all(calls, self.timeout_s, self._names())

    def _pull_each(self, ref: ray.ObjectRef, strength: float, skip: int, kind: str) -> None:
        """Asynchronous mode: every worker but ``skip`` queues a pull; nobody waits."""
        for i, w in enumerate(self.workers):
            if i != skip:
                w.pull.remote(ref, strength, False, kind)

    # ------------------------------------------------------------------ the peers' rounds

    def call_workers(self, method: str, args: list[tuple], num_returns: int = 1) -> dict[str, Any]:
        """Call ``method`` on every worker with its own ``args`` (started together, then one
        wait). Object references in ``args`` reach the workers as top-level arguments, so each
        worker reads them straight from its node's object store. With ``num_returns=2`` the
        second returns (published weights) come back as wrapped references, never fetched here."""
        calls = [getattr(w, method).options(num_returns=num_returns).remote(*a) for w, a in zip(self.workers, args)]
        firsts = calls if num_returns == 1 else [c[0] for c in calls]
        results = get_all(firsts, self.timeout_s, self._names())
        refs = [] if num_returns == 1 else [[c[1]] for c in calls]
        return {"group": self.plan.group, "results": results, "refs": refs}

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
        ``exchange``: a peer's per-step schedule (EASGD, DOWNPOUR), handed to every worker."""
        self._global_leader, self._lam = global_leader, lam
        self._local_period = tau * len(self.workers)  # l·τ steps summed over the group
        self._group_steps = 0
        handle = ray.get_runtime_context().current_actor
        return [w.run_async.remote(handle, report_every, max_steps, exchange) for w in self.workers]

    def report(self, index: int, steps: int, estimate: float) -> None:
        """A worker took ``steps`` more steps; pull the group toward its leader when due."""
        with self._lock:
            self.estimates[index] = estimate
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
        if due:
            ref = self.workers[leader].get_weights.remote()
            self._pull_each(ref, self._lam, skip=leader, kind="local")
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
        self._pull_each(wrapped_ref[0], strength, skip=skip, kind="global")
