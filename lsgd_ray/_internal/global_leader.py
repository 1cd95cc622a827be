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

from lsgd_ray._internal.waiting import get_all, worker_handles
from lsgd_ray.algorithms.lsgd import crossed, next_pull_step, pulls_due, select_leader
from lsgd_ray.config import LSGDConfig


class GlobalLeader:
    def __init__(self, local_leaders: list[Any], group_sizes: list[int], lsgd: LSGDConfig, timeout_s: float) -> None:
        self.local_leaders, self.group_sizes, self.cfg, self.timeout_s = local_leaders, group_sizes, lsgd, timeout_s
        self.num_groups = len(local_leaders)
        self.num_workers = sum(group_sizes)
        self.step = 0  # steps taken by each worker (synchronous mode)
        self.rounds = 0
        self.leader = -1  # global rank of the current global leader
        self.leader_estimate = math.inf
        self.leader_ref: ray.ObjectRef | None = None
        self.leader_counts = [0] * self.num_workers
        self.leader_changes: list[tuple[int, int]] = []  # (step, rank) whenever the leader changes
        self.estimates = [math.inf] * self.num_workers
        self.round_wall_s = 0.0
        self.round_compute_s = 0.0
        self.global_pulls = 0
        self.local_pulls = 0
        self._worker_handles: list[Any] | None = None
        self._pending_global: tuple[ray.ObjectRef, int] | None = None
        self._names = [f"LocalLeader {g}" for g in range(self.num_groups)]
        # asynchronous state
        self._lock = threading.Lock()
        self._total_steps = 0
        self._group_best: list[tuple[int, float]] = [(-1, math.inf)] * self.num_groups

    def setup(self) -> None:
        """Nothing to prepare (the peers' coordinators share this interface)."""

    def _handles(self) -> list[Any]:
        if self._worker_handles is None:
            self._worker_handles = worker_handles(self.local_leaders, self.timeout_s)
        return self._worker_handles

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
        get_all([ll.flush.remote(*self._global_args()) for ll in self.local_leaders], self.timeout_s, self._names)
        self._pending_global = None
        self.round_wall_s += time.perf_counter() - flush_start
        return self.status()

    def _global_args(self) -> tuple[list[ray.ObjectRef] | None, float, int]:
        if self._pending_global is None:
            return None, 0.0, -1
        return [self._pending_global[0]], self.cfg.lam_global, self._pending_global[1]

    def _round(self, cfg: LSGDConfig, max_step: int) -> None:
        round_start = time.perf_counter()
        target = min(next_pull_step(self.step, cfg.tau, cfg.tau_global, self.num_groups), max_step)
        local, global_ = pulls_due(target, cfg.tau, cfg.tau_global, self.num_groups)
        results = get_all(
            [
                ll.train_round.remote(target - self.step, local, cfg.lam, local or global_, *self._global_args())
                for ll in self.local_leaders
            ],
            self.timeout_s,
            self._names,
        )
        self._pending_global = None
        self.step, self.rounds = target, self.rounds + 1
        for r, size in zip(results, self.group_sizes):
            first = sum(self.group_sizes[: r["group"]])
            self.estimates[first : first + size] = r["estimates"]
        best = select_leader([r["leader_estimate"] for r in results])
        if best >= 0:
            self._set_leader(results[best]["leader"], results[best]["leader_estimate"], self.step)
            if results[best]["leader_ref"][0] is not None:
                self.leader_ref = results[best]["leader_ref"][0]  # the superseded one is released
        if local and cfg.lam > 0:
            self.local_pulls += 1
        if global_ and best >= 0 and self.leader_ref is not None and cfg.lam_global > 0:
            self._pending_global = (self.leader_ref, self.leader)  # sent with the next round
            self.global_pulls += 1
        self.round_wall_s += time.perf_counter() - round_start
        self.round_compute_s += max(max(r["compute_s"]) for r in results)

    def leader_weights(self) -> list[ray.ObjectRef | None]:
        """A reference to the current leader's weights, fresh from the worker (wrapped)."""
        if self.leader < 0:
            estimates = get_all(
                [h.stats.remote() for h in self._handles()],
                self.timeout_s,
                [f"worker {r}" for r in range(self.num_workers)],
            )
            rank = select_leader([s["estimate"] for s in estimates])
            self.leader = max(rank, 0)
        return [self._handles()[self.leader].get_weights.remote(False)]

    def status(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rounds": self.rounds,
            "leader": self.leader,
            "evaluated": f"leader (worker {self.leader})",
            "leader_estimate": self.leader_estimate,
            "estimates": list(self.estimates),
            "leader_counts": list(self.leader_counts),
            "leader_changes": list(self.leader_changes),
            "round_wall_s": self.round_wall_s,
            "round_compute_s": self.round_compute_s,
            "global_pulls": self.global_pulls,
            "local_pulls": self.local_pulls,
            "total_steps": self._total_steps or self.step * self.num_workers,
        }

    # ------------------------------------------------------------------ asynchronous mode

    def start_async(self, report_every: int, max_steps: int | None) -> list[ray.ObjectRef]:
        """Start every worker's loop through its LocalLeader; returns the loops' references."""
        self._global_period = self.cfg.tau_global * self.num_workers  # n·l·τ_G summed over workers
        handle = ray.get_runtime_context().current_actor
        lam = self.cfg.lam if self.num_groups > 1 else 0.0  # one group: only the global leader acts
        per_group = get_all(
            [ll.start_async.remote(handle, lam, self.cfg.tau, report_every, max_steps) for ll in self.local_leaders],
            self.timeout_s,
            self._names,
        )
        self._handles()
        return [ref for group in per_group for ref in group]

    def report(self, group: int, steps: int, best_rank: int, best_estimate: float) -> None:
        """A LocalLeader's worker took ``steps`` steps; run the global pull when it is due."""
        with self._lock:
            self._group_best[group] = (best_rank, best_estimate)
            before = self._total_steps
            self._total_steps += steps
            self.step = self._total_steps // self.num_workers
            if best_rank >= 0:
                self.estimates[best_rank] = best_estimate
            due = crossed(before, self._total_steps, self._global_period)
            best = select_leader([e for _, e in self._group_best])
            if not due or best < 0:
                return
            rank, estimate = self._group_best[best]
            self._set_leader(rank, estimate, self.step)
            self.global_pulls += 1
        if self.cfg.lam_global > 0:
            self.leader_ref = self._handles()[rank].get_weights.remote()
            wrapped = [self.leader_ref]
            for ll in self.local_leaders:
                ll.async_pull.remote(wrapped, self.cfg.lam_global, rank)
