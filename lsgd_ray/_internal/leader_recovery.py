"""LSGD's GlobalLeader when a group is lost: a LocalLeader that died (with its workers: they
share its fate) is re-formed from the leader's weights on its node, or, the node gone, on
another with room for its workers; its group is dropped when no node can take it. In
asynchronous mode the re-formed group's loops are started here and taken by the driver."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import ray

from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray._internal.waiting import get_all, replies_or_deaths
from lsgd_ray.config import LSGDConfig
from lsgd_ray.topology import GroupPlan


class LeaderRecovery(Coordinator):
    """The base of ``GlobalLeader``: its groups re-formed or dropped."""

    # what the GlobalLeader provides
    cfg: LSGDConfig
    leader: int  # global rank of the current global leader
    num_groups: int
    _worker_handles: dict[int, Any] | None
    _handles: Callable[[], dict[int, Any]]
    _recovering: threading.RLock
    _reform_step: int | None
    _async_started: bool
    _restarted: dict[int, list[ray.ObjectRef | None]]
    _group_best: list[tuple[int, float]]
    _global_period: int
    _count_group_steps: Callable[[int, int], None]

    def _gather_groups(self, calls: list[ray.ObjectRef], timeout_s: float) -> list[Any]:
        """The live groups' results (``calls`` went to ``self.local_leaders`` in order)."""
        return [reply for reply, died in self._replies(calls, timeout_s) if not died]

    def _replies(self, calls: list[ray.ObjectRef], timeout_s: float) -> list[tuple[Any, str]]:
        """Each group's ``(reply, "")``, or ``(None, reason)`` for one whose LocalLeader died
        (``calls`` went to ``self.local_leaders`` in order). A LocalLeader that died (with its
        workers: they share its fate) is re-formed from the leader's weights on its node, or,
        the node gone, on another with room for its workers; its group is dropped when no node
        can take it."""
        leaders = list(self.local_leaders)
        replies = replies_or_deaths(calls, timeout_s, self._names)
        for handle, reason in [(leaders[g], died) for g, (_, died) in enumerate(replies) if died]:
            with self._recovering:
                if handle in self.local_leaders:  # not recovered meanwhile by another call
                    self._recover_group(self.local_leaders.index(handle), reason)
        return replies

    def _survivor_source(self, exclude: Collection[int]) -> tuple[list[ray.ObjectRef | None], str]:
        """The current leader's weights if its worker lives (outside ``exclude``), else another
        live worker's (wrapped; ``[None]`` when there is none), and their name."""
        handles = {r: h for r, h in self._handles().items() if r not in exclude}
        rank = self.leader if self.leader in handles else next(iter(handles), -1)
        if rank < 0:
            return [None], "the initial weights"
        origin = "the leader's weights" if rank == self.leader else f"worker {rank}'s weights"
        return [handles[rank].get_weights.remote(count=False)], origin

    def _recover_group(self, g: int, reason: str) -> None:
        plan, name = self.plans[g], self._names[g]
        self._worker_handles = None
        event = {
            "group": plan.group,
            "ranks": list(plan.ranks),
            "reason": reason,
            "step": self.step,
            "time": time.time(),
        }
        factory = self.make_local_leader
        target = factory.placed(plan) if factory is not None else None
        if factory is None or target is None:
            event["reason"] = f"{reason} with its node, and no live node has the free resources for its workers"
        else:
            try:
                replacement = factory(target)
                get_all([replacement.ready.remote()], self.deadlines.nested_start_s, [f"new {name}"])
                g = self.plans.index(plan)
                self.local_leaders[g], self.plans[g] = replacement, target
                self._worker_handles = None
                source, origin = self._survivor_source(exclude=plan.ranks)
                steps = self.step if self._reform_step is None else self._reform_step
                get_all([replacement.reset_workers.remote(source, steps)], self.timeout_s, [f"new {name}"])
                if self._async_started:
                    self._restart_group_async(target, replacement)
                self.events.append({"event": "group_replaced", **event, "from": origin, "node_id": target.node_id})
                where = "its node" if target == plan else f"node {target.node_id[:8]} (its own was lost)"
                self.log.warning(f"{name} {reason}: group re-formed on {where} from {origin}")
                return
            except Exception as exc:  # re-placing failed: drop the group instead
                event["reason"] = f"{reason}; could not re-form it: {type(exc).__name__}: {exc}"
        if len(self.plans) == 1:
            raise RuntimeError(f"{name} {event['reason']}, and it was the last group")
        g = self.plans.index(plan)  # a recovery nested in this one may have dropped another group
        for seq in (self.local_leaders, self.plans, self.group_sizes, self._names):
            del seq[g]
        self.num_groups, self.num_workers = len(self.plans), sum(self.group_sizes)
        self._worker_handles = None
        if self._async_started:
            self._drop_group_async(plan)
        self.events.append({"event": "group_dropped", **event})
        self.log.warning(f"{name} {event['reason']}: group dropped, training goes on with the rest")

    def _restart_group_async(self, plan: GroupPlan, replacement: Any) -> None:
        """Asynchronous mode: start the re-formed group's loops (its workers are at ``self.step``);
        the driver takes them with ``restart_loops``."""
        loops = get_all([replacement.start_async.remote(*self._async_args)], self.timeout_s, ["new LocalLeader"])[0]
        with self._lock:
            self._count_group_steps(plan.group, self.step * plan.num_workers)
        self._restarted.update({rank: [ref] for rank, ref in zip(plan.ranks, loops)})

    def _drop_group_async(self, plan: GroupPlan) -> None:
        with self._lock:
            self._count_group_steps(plan.group, 0)
            self._group_best[plan.group] = (-1, math.inf)
            self._global_period = self.cfg.tau_global * self.num_workers
            self.step = self._total_steps // self.num_workers
        self._restarted.update({rank: [None] for rank in plan.ranks})
