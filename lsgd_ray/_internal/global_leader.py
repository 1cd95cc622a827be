"""GlobalLeader: one actor, no GPU. Runs the synchronous rounds and the global pulls.

It talks to the LocalLeaders only. The global leader is the best of the local leaders; its
weights are already in the object store (its LocalLeader published them), so the global pull
sends every group the same reference and each node reads it from its own shared memory.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import ray

from lsgd_ray._internal.leader_recovery import LeaderRecovery
from lsgd_ray._internal.protocol import Failure
from lsgd_ray._internal.waiting import ActorTimeoutError, answers, replies_or_deaths
from lsgd_ray.algorithms.lsgd import crossed, next_pull_step, pulls_due, select_leader, weighted_mean
from lsgd_ray.config import LSGDConfig

CENTER = "center (mean of all workers)"  # what a run evaluating the center names its model


class GlobalLeader(LeaderRecovery):
    def _init_state(self) -> None:
        self.cfg = self.config.lsgd
        self.num_groups = len(self.local_leaders)
        # by global rank and group id, which stay those of the run's start when groups are dropped
        rank_slots = len(self.estimates)
        group_slots = max(p.group for p in self.plans) + 1
        self.leader = -1  # global rank of the current global leader
        self.leader_estimate = math.inf
        self.leader_ref: ray.ObjectRef | None = None
        self.leader_counts = [0] * rank_slots
        self.leader_changes: list[tuple[int, int]] = []  # (step, rank) whenever the leader changes
        self.global_pulls = 0
        self.local_pulls = 0
        self.global_pulls_skipped = 0  # async: due while the last leader snapshot was still queued
        self._worker_handles: dict[int, Any] | None = None
        self._async_started = False
        self._pending_global: tuple[ray.ObjectRef, int] | None = None
        # asynchronous state
        self._pull_lock = threading.Lock()  # the global pull's snapshot
        self._global_in_flight: list[ray.ObjectRef] = []  # the LocalLeaders' async_pull calls
        self._group_best: list[tuple[int, float]] = [(-1, math.inf)] * group_slots
        self._group_steps: dict[int, int] = {}  # steps summed over each group's workers, by group id
        self._restarted: dict[int, list[ray.ObjectRef | None]] = {}  # new loops not yet taken by the driver
        self._reform_step: int | None = None  # synchronous: the step the round being gathered ends at
        self._recovering = threading.RLock()  # one recovery at a time (reports and the driver may both notice)
        self._next_rejoin_check = 0.0
        self._unready: set[int] = set()  # ranks of a group being re-formed: new workers, not yet reset
        self._late_groups: set[int] = set()  # groups whose LocalLeader did not answer in time (logged)

    STATE = (
        *LeaderRecovery.STATE,
        "leader",
        "leader_estimate",
        "leader_counts",
        "leader_changes",
        "global_pulls",
        "local_pulls",
        "global_pulls_skipped",
        "_group_best",
        "_group_steps",
    )

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if self._total_steps:  # asynchronous: count the steps of the groups in the run, these at ``step``
            self._group_steps = {p.group: self._group_steps.get(p.group, self.step * p.num_workers) for p in self.plans}
            self._total_steps = sum(self._group_steps.values())
        self.leader_changes = [(int(step), int(rank)) for step, rank in self.leader_changes]
        self._group_best = [(int(step), float(loss)) for step, loss in self._group_best]
        self._pending_global, self.leader_ref = None, None

    def _handles(self) -> dict[int, Any]:
        """Worker handles by global rank (a dropped group's ranks are absent)."""
        while self._worker_handles is None:
            leaders, plans = list(self.local_leaders), list(self.plans)
            per_group = self._gather_groups([ll.worker_handles.remote() for ll in leaders], self.timeout_s)
            if leaders == self.local_leaders:  # every one answered: none was re-formed or dropped
                handles = {rank: h for plan, hs in zip(plans, per_group) for rank, h in zip(plan.ranks, hs)}
                self._worker_handles = handles
        return self._worker_handles

    def _count_group_steps(self, group: int, steps: int) -> None:
        """Set group ``group``'s share of the steps summed over the workers (under ``_lock``)."""
        self._total_steps += steps - self._group_steps.get(group, 0)
        self._group_steps[group] = steps

    def _set_leader(self, rank: int, estimate: float, step: int) -> None:
        if rank != self.leader:
            self.leader_changes.append((step, rank))
        self.leader, self.leader_estimate = rank, estimate
        if rank >= 0:
            self.leader_counts[rank] += 1

    # ------------------------------------------------------------------ synchronous mode

    def run_rounds(self, max_seconds: float, max_step: int) -> dict[str, Any]:
        """Run synchronous rounds until ``max_seconds`` have passed or workers reach ``max_step``,
        then apply the pulls still pending so every worker's weights are current."""
        cfg, start = self.cfg, time.perf_counter()
        while self.step < max_step and time.perf_counter() - start < max_seconds:
            self._round(cfg, max_step)
        flush_start = time.perf_counter()
        flushes = [ll.flush.remote(*self._global_args()) for ll in self.local_leaders]
        self._gather_groups(flushes, self.deadlines.group_round_s)  # a group may replace a lost worker
        self._pending_global = None
        self.round_wall_s += time.perf_counter() - flush_start
        return self.status()

    def _global_args(self) -> tuple[list[ray.ObjectRef] | None, float, int]:
        if self._pending_global is None:
            return None, 0.0, -1
        return [self._pending_global[0]], self.cfg.lam_global, self._pending_global[1]

    def _round(self, cfg: LSGDConfig, max_step: int) -> None:
        round_start = time.perf_counter()
        self._rejoin_dropped()  # a dropped group whose node (or another with room) is back
        target = min(next_pull_step(self.step, cfg.tau, cfg.tau_global, self.num_groups), max_step)
        local, global_ = pulls_due(target, cfg.tau, cfg.tau_global, self.num_groups)
        self._reform_step = target  # a group re-formed in this round starts where the round ends
        try:
            results = self._gather_groups(
                [
                    ll.train_round.remote(target - self.step, local, cfg.lam, local or global_, *self._global_args())
                    for ll in self.local_leaders
                ],
                self.deadlines.group_round_s,  # wait out a hung worker, then replace it
            )
        finally:
            self._reform_step = None
        self._pending_global = None
        self.step, self.rounds = target, self.rounds + 1
        self._record_events([e for r in results for e in r.events])
        for r in results:
            plan = next((p for p in self.plans if p.group == r.group), None)
            if plan is not None:  # else dropped meanwhile (a recovery in the same gather)
                self.estimates[plan.first_rank : plan.first_rank + plan.num_workers] = r.estimates
        best = select_leader([r.leader_estimate for r in results])
        if best >= 0:
            self._set_leader(results[best].leader, results[best].leader_estimate, self.step)
            if results[best].leader_ref is not None:
                self.leader_ref = results[best].leader_ref  # the superseded one is released
        if local and cfg.lam > 0:
            self.local_pulls += 1
        if global_ and best >= 0 and self.leader_ref is not None and cfg.lam_global > 0:
            self._pending_global = (self.leader_ref, self.leader)  # sent with the next round
            self.global_pulls += 1
        self.round_wall_s += time.perf_counter() - round_start
        # every group lost in this round (all re-formed or dropped): no compute to count
        self.round_compute_s += max((max(r.compute_s, default=0.0) for r in results), default=0.0)

    def _record_events(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)
        if any(e["event"] == "worker_replaced" for e in events):
            self._worker_handles = None  # a replaced worker has a new handle

    def leader_weights(self) -> list[ray.ObjectRef | None]:
        """A reference to the current leader's weights, fresh from the worker (wrapped). A
        leader lost at this moment (or not known yet, after a restart) gives way to the best
        of the workers that answer; the lost one is replaced at the next round."""
        alive = self._answering_workers()
        if not alive and not self._async_started:  # every worker lost at this moment: repaired, once
            self.repair_groups()
            alive = self._answering_workers()
        if not alive:
            raise ActorTimeoutError(f"no worker answered within {self.timeout_s:g}s: no weights to evaluate")
        handles = self._handles()
        if self.leader not in [r for r, _ in alive]:
            self.leader = alive[max(select_leader([s["estimate"] for _, s in alive]), 0)][0]
        return [handles[self.leader].get_weights.remote(count=False)]

    def repair_groups(self) -> None:
        """Synchronous mode, between rounds: each LocalLeader replaces its workers that died or
        hang now (from a live worker of its group, or the global leader's weights it last
        pulled toward), without waiting for the next round to find them."""
        flushes = [ll.flush.remote() for ll in self.local_leaders]
        self._gather_groups(flushes, self.deadlines.group_round_s)
        self.status()  # takes the replacements' events, and with them the new handles

    def _answering_workers(self) -> list[tuple[int, dict[str, Any]]]:
        """``(rank, stats)`` of each worker that answers now."""
        handles = self._handles()
        ranks = list(handles)
        stats = answers([handles[r].stats.remote() for r in ranks], self.timeout_s)
        return [(r, s) for r, s in zip(ranks, stats) if s is not None]

    def center_weights(self) -> list[ray.ObjectRef]:
        """A reference to the center, the mean of every worker's weights (wrapped). Each
        LocalLeader averages its own workers on its node; here the group means are combined,
        weighted by their worker counts, one at a time, into one array put in the object
        store: no weights pass through the driver. A LocalLeader that died is handled as
        everywhere (``_gather_groups``: its group is re-formed or dropped) and its group is
        left out of this center."""
        calls = [ll.group_mean.remote() for ll in self.local_leaders]
        # each waits call_s on its workers; a group that does not answer (its node unreachable) is left out
        replies = self._gather_groups(calls, self.deadlines.through_leader(self.deadlines.call_s), late_ok=True)
        replies = [reply for reply in replies if reply["count"]]  # a group with no worker answering: left out
        if not replies:
            raise ActorTimeoutError(f"no worker answered within {self.timeout_s:g}s: no center to evaluate")
        means = (ray.get(reply["mean"][0]) for reply in replies)  # fetched one at a time
        return [ray.put(weighted_mean(means, [reply["count"] for reply in replies]))]

    def status(self) -> dict[str, Any]:
        # a LocalLeader that does not answer in time (its node unreachable) is asked again next time
        replies = self._gather_groups([ll.status.remote() for ll in self.local_leaders], self.timeout_s, late_ok=True)
        self._record_events([e for reply in replies for e in reply["events"]])
        skipped = {kind: sum(reply["pulls_skipped"][kind] for reply in replies) for kind in ("local", "global")}
        return {
            "step": self.step,
            "rounds": self.rounds,
            "leader": self.leader,
            "evaluated": CENTER if self.cfg.evaluate == "center" else f"leader (worker {self.leader})",
            "leader_estimate": self.leader_estimate,
            "estimates": list(self.estimates),
            "leader_counts": list(self.leader_counts),
            "leader_changes": list(self.leader_changes),
            "round_wall_s": self.round_wall_s,
            "round_compute_s": self.round_compute_s,
            "global_pulls": self.global_pulls,
            "local_pulls": self.local_pulls,
            "global_pulls_skipped": self.global_pulls_skipped,
            "pulls_skipped": skipped,  # async backpressure, per worker (LocalLeader._pull_each)
            "total_steps": self._total_steps or self.step * self.num_workers,
            "events": list(self.events),
        }

    # ------------------------------------------------------------------ asynchronous mode

    def start_async(self, report_every: int, max_steps: int | None) -> dict[int, list[ray.ObjectRef | None]]:
        """Start every worker's loop through its LocalLeader; returns the loops by rank, wrapped
        as ``restart_loops`` returns them (a group whose LocalLeader died meanwhile was re-formed
        and started, or dropped: ``[None]``)."""
        self._global_period = self.cfg.tau_global * self.num_workers  # n·l·τ_G summed over workers
        self._async_started = True
        handle = ray.get_runtime_context().current_actor
        lam = self.cfg.lam if self.num_groups > 1 else 0.0  # one group: only the global leader acts
        self._async_args = (handle, lam, self.cfg.tau, report_every, max_steps)
        plans = list(self.plans)
        replies = self._replies([ll.start_async.remote(*self._async_args) for ll in self.local_leaders], self.timeout_s)
        self._handles()
        loops: dict[int, list[ray.ObjectRef | None]] = {}
        with self._recovering:
            for plan, (refs, died) in zip(plans, replies):
                for i, rank in enumerate(plan.ranks):
                    loops[rank] = self._restarted.pop(rank, [None]) if died else [refs[i]]
        return loops

    def restart_loops(self, failed: dict[int, Failure]) -> dict[int, list[ray.ObjectRef | None]]:
        """Asynchronous mode: the loops of ``failed`` (by rank) ended because a process
        died. A group whose LocalLeader died is re-formed with new loops, or dropped; a dead
        worker of a live group is replaced on its node from the leader's weights and its loop
        started again (its LocalLeader dying meanwhile is a lost group too). Returns the new
        loop of every rank restarted since the last call (wrapped; ``[None]``: its group was
        dropped)."""
        self.status()  # asks every LocalLeader: those that died have their groups recovered
        with self._recovering:
            restarted, self._restarted = self._restarted, {}
            calls = {}
            for rank, failure in failed.items():
                if rank in restarted:
                    continue
                # asking the workers for a source may recover a group (a LocalLeader found dead):
                # its loops are then in ``_restarted``, and the groups' order may have changed
                source, origin = self._survivor_source(exclude=failed)
                if rank in self._restarted:
                    continue
                g = next(i for i, p in enumerate(self.plans) if rank in p.ranks)
                leader = self.local_leaders[g]
                calls[rank] = (leader, leader.replace_async.remote(rank, failure.reason, source, origin))
            timeout = self.deadlines.replace_s
            for rank, (leader, ref) in calls.items():
                ((reply, died),) = replies_or_deaths([ref], timeout, [f"replacement of worker {rank}"])
                if not died:
                    restarted[rank] = reply[:1]
                elif leader in self.local_leaders:  # not recovered meanwhile (for another rank)
                    # the LocalLeader died amid the replacement, and its workers with it (a chaos
                    # run's abort): its group is re-formed, its loops started, or dropped
                    self._recover_group(self.local_leaders.index(leader), f"its LocalLeader {died}")
            restarted.update(self._restarted)  # the groups recovered meanwhile
            self._restarted = {}
            self._worker_handles = None
        return restarted

    def report(self, group: int, steps: int, best_rank: int, best_estimate: float) -> None:
        """A LocalLeader's worker took ``steps`` steps; run the global pull when it is due."""
        with self._lock:
            self._group_best[group] = (best_rank, best_estimate)
            before = self._total_steps
            self._count_group_steps(group, self._group_steps.get(group, 0) + steps)
            self.step = self._total_steps // self.num_workers
            if best_rank >= 0:
                self.estimates[best_rank] = best_estimate
            due = crossed(before, self._total_steps, self._global_period)
            best = select_leader([e for _, e in self._group_best])
            if not due or best < 0:
                return
            rank, estimate = self._group_best[best]
            self._set_leader(rank, estimate, self.step)
        handle = self._handles().get(rank)  # None: its group was dropped meanwhile
        if self.cfg.lam_global <= 0 or handle is None:
            return
        with self._pull_lock:
            # backpressure: while the last pull is still queued (its snapshot not taken, or not
            # yet handed on by every LocalLeader), it stands for this one
            last = [self.leader_ref, *self._global_in_flight] if self.leader_ref is not None else []
            if last and len(ray.wait(last, num_returns=len(last), timeout=0)[0]) < len(last):
                self.global_pulls_skipped += 1
                return
            self.global_pulls += 1
            self.leader_ref = handle.get_weights.remote()
            wrapped = [self.leader_ref]
            self._global_in_flight = [
                ll.async_pull.remote(wrapped, self.cfg.lam_global, rank) for ll in self.local_leaders
            ]
