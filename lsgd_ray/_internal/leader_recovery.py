"""LSGD's GlobalLeader when a group is lost: a LocalLeader that died (with its workers: they
share its fate) is re-formed from the leader's weights on its node, or, the node gone, on
another with room for its workers; its group is dropped when no node can take it, and comes
back (both modes) once a node has room for it again. In asynchronous mode the re-formed
group's loops are started here and taken by the driver."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import ray

from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray._internal.protocol import groups_out
from lsgd_ray._internal.waiting import LATE, get_all, replies_or_deaths
from lsgd_ray.config import LSGDConfig
from lsgd_ray.topology import GroupPlan

NO_ROOM = "no live node has the free resources for its workers"
REFORM_ATTEMPTS = 3  # re-forming a lost group, before it is dropped
# the last group cannot be dropped: it is tried longer before the run stops (a chaos run's
# killer struck three of its new LocalLeaders in a row)
LAST_GROUP_ATTEMPTS = 10
REFORM_PAUSE_S = 2.0  # between attempts: time for the cluster to mark a removed node dead
REJOIN_CHECK_S = 2.0  # synchronous mode: how often the rounds look for room for a dropped group


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
    _next_rejoin_check: float  # time.monotonic() of the next look for room for a dropped group
    _unready: set[int]  # ranks of a group being re-formed (its new workers not reset yet): no source
    _answering_workers: Callable[[], list[tuple[int, dict[str, Any]]]]
    _late_groups: set[int]  # groups whose LocalLeader did not answer the last call that allowed it

    def _gather_groups(self, calls: list[ray.ObjectRef], timeout_s: float, late_ok: bool = False) -> list[Any]:
        """The live groups' results (``calls`` went to ``self.local_leaders`` in order);
        ``late_ok``: a group that did not answer in time is left out too."""
        return [reply for reply, died in self._replies(calls, timeout_s, late_ok) if not died]

    def _replies(self, calls: list[ray.ObjectRef], timeout_s: float, late_ok: bool = False) -> list[tuple[Any, str]]:
        """Each group's ``(reply, "")``, or ``(None, reason)`` for one whose LocalLeader died
        (``calls`` went to ``self.local_leaders`` in order). A LocalLeader that died (with its
        workers: they share its fate) is re-formed from the leader's weights on its node, or,
        the node gone, on another with room for its workers; its group is dropped when no node
        can take it. One that has not answered within ``actor_timeout_s`` is named in the log
        (a slow or cut link, a busy node) while the wait goes on, up to ``timeout_s``; then the
        wait raises, or, with ``late_ok``, gives ``(None, LATE)`` for it."""
        leaders, names, plans = list(self.local_leaders), list(self._names), list(self.plans)
        waited = time.monotonic()
        if timeout_s > self.timeout_s:
            ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=self.timeout_s)
            late = [g for g, call in enumerate(calls) if call not in ready]
            if late:
                where = ", ".join(f"{names[g]} (node {plans[g].node_id[:8]})" for g in late)
                self.log.warning(f"{where}: no answer within {self.timeout_s:g}s; waiting up to {timeout_s:g}s")
        left = max(timeout_s - (time.monotonic() - waited), 0.0)
        replies = replies_or_deaths(calls, left, names, late_ok)
        if late_ok:  # named once when it stops answering, and once when it answers again
            late_now = {plans[g].group for g, (_, died) in enumerate(replies) if died == LATE}
            for plan in plans:
                if (plan.group in late_now) != (plan.group in self._late_groups):
                    name = f"{names[plans.index(plan)]} (node {plan.node_id[:8]})"
                    words = f"no answer within {timeout_s:g}s: left out" if plan.group in late_now else "answers again"
                    self.log.warning(f"{name}: {words}")
            self._late_groups = late_now
        lost = [(leaders[g], died) for g, (_, died) in enumerate(replies) if died and died != LATE]
        for handle, reason in lost:
            with self._recovering:
                if handle in self.local_leaders:  # not recovered meanwhile by another call
                    self._recover_group(self.local_leaders.index(handle), reason)
        return replies

    def _survivor_source(self, exclude: Collection[int]) -> tuple[list[ray.ObjectRef | None], str]:
        """The current leader's weights if its worker answers (outside ``exclude``), else another
        answering worker's (wrapped), else the checkpoint's (``_checkpoint_source``), and their
        name. A worker that died but is still listed (its LocalLeader has not replaced it yet)
        is passed over: every re-forming attempt from it would fail."""
        answering = {r for r, _ in self._answering_workers()} - set(exclude) - self._unready
        handles = {r: h for r, h in self._handles().items() if r in answering}
        rank = self.leader if self.leader in handles else next(iter(handles), -1)
        if rank < 0:
            return self._checkpoint_source()
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
        failures: list[str] = []
        # a failure amid the re-forming (its new LocalLeader or worker lost) tries again
        while len(failures) < (REFORM_ATTEMPTS if len(self.plans) > 1 else LAST_GROUP_ATTEMPTS):
            if failures:
                time.sleep(REFORM_PAUSE_S)
            failure = self._reform(plan, name, reason, event)
            if failure is None:
                return
            failures.append(failure)
            if NO_ROOM in failure:  # trying again will not help
                break
        event["reason"] = failures[-1] if len(failures) == 1 else f"{failures[-1]} (after {len(failures)} attempts)"
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

    def _reform(self, plan: GroupPlan, name: str, reason: str, event: dict[str, Any]) -> str | None:
        """One attempt to re-form ``plan``'s group: a new LocalLeader on its node (or another
        with room), its workers started from a survivor's weights. ``None`` when it worked,
        else why not (the new LocalLeader, if any, is killed)."""
        factory = self.make_local_leader
        target = factory.placed(plan, self.plans) if factory is not None else None
        if factory is None or target is None:
            return f"{reason} with its node, and {NO_ROOM}"
        replacement, g = None, self.plans.index(plan)
        dead = self.local_leaders[g]
        try:
            replacement = self._start_local_leader(target, f"new {name}")
            g = self.plans.index(plan)  # a recovery nested in this one may have dropped another group
            # in its place before its workers are reset, so that a recovery nested in the reset
            # finds the group being re-formed, not its dead LocalLeader
            self.local_leaders[g], self.plans[g] = replacement, target
            self._worker_handles = None
            self._unready.update(plan.ranks)  # a group re-formed meanwhile (nested) must not start from these
            try:
                steps = self.step if self._reform_step is None else self._reform_step
                origin = self._seed_group(replacement, plan, steps, f"new {name}")
            finally:
                self._unready.difference_update(plan.ranks)
            if self._async_started:
                self._restart_group_async(target, replacement)
        except Exception as exc:  # re-placing failed
            if replacement is not None:
                with contextlib.suppress(Exception):
                    ray.kill(replacement)
            if target in self.plans:  # the group as it was, for the next attempt or the drop
                g = self.plans.index(target)
                self.local_leaders[g], self.plans[g] = dead, plan
                self._worker_handles = None
            return f"{reason}; could not re-form it: {type(exc).__name__}: {exc}"
        self.events.append({"event": "group_replaced", **event, "from": origin, "node_id": target.node_id})
        where = "its node" if target == plan else f"node {target.node_id[:8]} (its own was lost)"
        self.log.warning(f"{name} {reason}: group re-formed on {where} from {origin}")
        return None

    def _start_local_leader(self, target: GroupPlan, label: str) -> Any:
        """A new LocalLeader for ``target`` (its workers from the last checkpoint), ready; one
        that does not get ready is killed."""
        assert self.make_local_leader is not None
        leader = self.make_local_leader(target, self.last_checkpoint)
        try:
            get_all([leader.ready.remote()], self.deadlines.nested_start_s, [label])
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(leader)
            raise
        return leader

    def _seed_group(self, leader: Any, plan: GroupPlan, steps: int, label: str) -> str:
        """``leader``'s workers set to a survivor's weights (not ``plan``'s own ranks) at
        ``steps``; returns where the weights came from."""
        source, origin = self._survivor_source(exclude=plan.ranks)
        get_all(
            [leader.reset_workers.remote(source, steps)],
            self.deadlines.through_leader(self.deadlines.first_call_s),
            [label],
        )
        return origin

    def _dropped_plans(self) -> list[GroupPlan]:
        """The groups dropped and not back, from the run's events (so a restarted coordinator
        knows them too); their node is unknown."""
        in_run = {p.group for p in self.plans}
        out = sorted((g, e["ranks"]) for g, e in groups_out(self.events).items() if g not in in_run)
        return [GroupPlan(g, "", len(ranks), ranks[0]) for g, ranks in out]

    def rejoin_groups(self) -> dict[int, list[ray.ObjectRef | None]]:
        """Asynchronous mode, asked by the driver while a group is dropped: the dropped groups a
        node has room for again rejoin, their loops started; returns every loop started since
        the driver last took them, as ``restart_loops`` does."""
        with self._recovering:
            self._rejoin_dropped()
            restarted, self._restarted = self._restarted, {}
        return restarted

    def _rejoin_dropped(self) -> None:
        """At most every ``REJOIN_CHECK_S`` (synchronous mode: between rounds; asynchronous: when
        the driver asks): a dropped group whose workers a live node has room for again (a node
        joined the cluster, or resources were freed) starts there, from the leader's weights at
        the current step (a fresh optimizer; its ranks keep their shards). A failed attempt
        leaves it dropped, for later."""
        now = time.monotonic()
        if self.make_local_leader is None or now < self._next_rejoin_check:
            return
        self._next_rejoin_check = now + REJOIN_CHECK_S
        for plan in self._dropped_plans():
            target = self.make_local_leader.placed(plan, self.plans)
            if target is None:
                continue
            newcomer = None
            try:
                newcomer = self._start_local_leader(target, f"LocalLeader {plan.group}")
                origin = self._seed_group(newcomer, plan, self.step, f"LocalLeader {plan.group}")
            except Exception as exc:  # e.g. the node went again: try later
                if newcomer is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(newcomer)
                self.log.warning(f"group {plan.group} could not rejoin on node {target.node_id[:8]}: {exc}")
                continue
            g = sum(p.group < plan.group for p in self.plans)  # the plans stay in group order
            self.local_leaders.insert(g, newcomer)
            self.plans.insert(g, target)
            self.group_sizes.insert(g, target.num_workers)
            self._names.insert(g, f"LocalLeader {plan.group}")
            self.num_groups, self.num_workers = len(self.plans), sum(self.group_sizes)
            self._worker_handles = None
            if self._async_started:
                with self._lock:
                    self._global_period = self.cfg.tau_global * self.num_workers
                self._restart_group_async(target, newcomer)
            self.events.append(
                {
                    "event": "group_rejoined",
                    "group": plan.group,
                    "ranks": list(plan.ranks),
                    "node_id": target.node_id,
                    "step": self.step,
                    "from": origin,
                    "time": time.time(),
                }
            )
            self.log.warning(f"group {plan.group} rejoined on node {target.node_id[:8]} from {origin}")

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
