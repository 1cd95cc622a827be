"""Coordinators for the peer algorithms: the GlobalLeader's role for each of them.

Each drives its algorithm's rounds over the LocalLeaders (who call their own workers) and has
the GlobalLeader's interface (``run_rounds``, ``status``, ``leader_weights``, ``start_async``,
``report``), so the Trainer, the logs and the result files are the same for every algorithm.
None of them imports torch, and none touches weights on the training path: weights travel as
object references (EASGD's differences go straight to the ParameterServer; gossip neighbours
read each other's published weights), or inside the workers' own collectives.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray

from lsgd_ray._internal.peer_groups import REPLACE_PASSES
from lsgd_ray._internal.peer_recovery import PeerRecovery, wrapped_weights
from lsgd_ray._internal.protocol import Failure
from lsgd_ray._internal.waiting import ActorTimeoutError, answers, get_all, replies_or_deaths, worker_handles
from lsgd_ray.algorithms import diloco, local_sgd

ROUND_STEPS = 16  # data-parallel SGD has no period of its own: rounds only pace evaluation
SETUP_TRIES = 3  # forming the collective group, while no worker is lost (``_setup_collective``)


class PeerCoordinator(PeerRecovery):
    evaluated = "average of the workers"

    def _init_state(self) -> None:
        self.cfg = self.config
        self._fresh: set[int] = set()  # ranks whose worker is a new process not yet restarted
        self.group_ranks = [list(p.ranks) for p in self.plans]
        self._worker_handles: list[Any] | None = None

    # ------------------------------------------------------------------ plumbing

    def _handles(self) -> list[Any]:
        if self._worker_handles is None:
            self._worker_handles = worker_handles(self.local_leaders, self.timeout_s)
        return self._worker_handles

    def _worker_names(self) -> list[str]:
        return [f"worker {r}" for r in range(self.num_workers)]

    def setup(self) -> None:
        """Anything the algorithm needs before its first step (collectives, the server)."""

    def _setup_collective(self, allreduce_grads: bool) -> None:
        """Form the workers' torch.distributed group at a fresh address, after every worker has
        left the one it was in (a group a dead peer broke, or a dead coordinator's). A set-up
        that failed with no worker lost (one too slow to join on a busy machine: a chaos run's
        abort) is tried again once every worker's join has ended, so that none runs into the
        next try's; a worker that died or still hangs is left to the caller's recovery."""
        handles, names = self._handles(), self._worker_names()
        backend = "nccl" if self.cfg.gpus_per_worker >= 1 else "gloo"
        for attempt in range(1, SETUP_TRIES + 1):
            get_all([h.close_collective.remote() for h in handles], self.timeout_s, names)
            address = get_all([handles[0].collective_address.remote()], self.timeout_s, ["worker 0"])[0]
            args = (address, self.num_workers, self.group_ranks, backend, allreduce_grads)
            joins = [h.setup_collective.remote(*args) for h in handles]
            try:
                get_all(joins, self.timeout_s, names, hint="torch.distributed could not form its process group")
                return
            except (ActorTimeoutError, ray.exceptions.RayTaskError) as exc:
                if attempt == SETUP_TRIES or not self._joins_ended(joins):
                    raise
                why = exc if isinstance(exc, ActorTimeoutError) else exc.cause
                self.log.warning(f"the collective group did not form ({why}), no worker lost: formed again")

    def _joins_ended(self, joins: list[ray.ObjectRef]) -> bool:
        """Whether every worker's ``setup_collective`` call ended, joined or failed, within a
        join's longest time (its store's connection, its handshake and each group's, each
        bounded by the collective timeout), with none of them dead."""
        bound_s = (3 + len(self.group_ranks)) * self.timeout_s
        _, pending = ray.wait(joins, num_returns=len(joins), timeout=bound_s)
        if pending:
            return False
        for join in joins:
            try:
                ray.get(join)
            except ray.exceptions.RayTaskError:  # its own failure to join: it is free to try again
                continue
            except ray.exceptions.RayError:  # it died (or its reply was lost with its node)
                return False
        return True

    # ------------------------------------------------------------------ synchronous rounds

    def run_rounds(self, max_seconds: float, max_step: int) -> dict[str, Any]:
        start = time.perf_counter()
        while self.step < max_step and time.perf_counter() - start < max_seconds:
            round_start = time.perf_counter()
            target = min(self._next_step(self.step), max_step)
            results = self._train(target - self.step, target)
            self.estimates = [r["estimate"] for r in results]
            self.step, self.rounds = target, self.rounds + 1
            self.round_wall_s += time.perf_counter() - round_start
            self.round_compute_s += max(r["compute_s"] for r in results)
        finish = time.perf_counter()
        self._finish()
        self.round_wall_s += time.perf_counter() - finish
        return self.status()

    def _next_step(self, step: int) -> int:
        return step + ROUND_STEPS

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} has no synchronous mode")

    def _finish(self) -> None:
        """Apply whatever the last round left pending, so every worker's weights are current."""

    # ------------------------------------------------------------------ what gets evaluated

    def leader_weights(self) -> list[ray.ObjectRef]:
        """The model this algorithm evaluates, by reference (wrapped): here the workers' mean,
        of those that answer (one lost between rounds is replaced at the next round)."""
        return [ray.put(self._mean_of(self._handles()))]

    def _mean_of(self, handles: list[Any]) -> np.ndarray:
        """The mean of the weights of the workers of ``handles`` that answer in time."""
        replies = answers([h.get_weights.remote(count=False) for h in handles], self.timeout_s)
        arrays = [a for a in replies if a is not None]
        if not arrays:
            raise ActorTimeoutError(f"no worker answered within {self.timeout_s:g}s: no weights to average")
        mean = np.zeros_like(arrays[0])
        for array in arrays:
            mean += array
        mean /= len(arrays)
        return mean

    def status(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rounds": self.rounds,
            "leader": -1,
            "evaluated": self.evaluated,
            "leader_estimate": min(self.estimates, default=math.inf),
            "estimates": list(self.estimates),
            "leader_counts": [],
            "leader_changes": [],
            "round_wall_s": self.round_wall_s,
            "round_compute_s": self.round_compute_s,
            "global_pulls": 0,
            "local_pulls": 0,
            "total_steps": self._total_steps or self.step * self.num_workers,
            "events": list(self.events),
        }

    # ------------------------------------------------------------------ asynchronous mode

    def _exchange(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous mode")

    def start_async(self, report_every: int, max_steps: int | None) -> dict[int, list[ray.ObjectRef | None]]:
        """Start every worker's loop; returns them by rank, wrapped as ``restart_loops`` does (a
        group whose LocalLeader died meanwhile is re-formed and started)."""
        handle = ray.get_runtime_context().current_actor
        self._async_args = (handle, 0.0, 1, report_every, max_steps, self._exchange())
        calls = [ll.start_async.remote(*self._async_args) for ll in self.local_leaders]
        loops: dict[int, list[ray.ObjectRef | None]] = {}
        for g, (refs, died) in enumerate(replies_or_deaths(calls, self.timeout_s, self._names)):
            if died:
                loops.update(self._reform_group_async(g, f"its LocalLeader {died}", self.leader_weights()))
            else:
                loops.update({rank: [ref] for rank, ref in zip(self.group_ranks[g], refs)})
        return loops

    replacement_origin = "the leader's weights"

    def restart_loops(self, failed: dict[int, Failure]) -> dict[int, list[ray.ObjectRef | None]]:
        """Asynchronous mode (EASGD, DOWNPOUR): each worker of ``failed`` (by rank) is
        replaced on its node from the server's weights and its loop started again; a group
        whose LocalLeader died gets a new one with new workers, started the same way. Returns
        the new loops (wrapped)."""
        source = self.leader_weights()
        restarted: dict[int, list[ray.ObjectRef | None]] = {}
        for rank, failure in sorted(failed.items()):
            if rank not in restarted:
                restarted.update(self._restart_loop(rank, failure.reason, source))
        self._worker_handles = None
        return restarted

    def _restart_loop(
        self, rank: int, reason: str, source: list[ray.ObjectRef]
    ) -> dict[int, list[ray.ObjectRef | None]]:
        """Worker ``rank`` replaced from ``source`` and its loop started, or, its LocalLeader
        lost (before, during or right after: a chaos run's abort), its whole group re-formed and
        started (again, if the new LocalLeader is lost too); the new loops by rank."""
        g, _ = self._locate(rank)
        lost = ""
        for attempt in range(1, REPLACE_PASSES + 1):
            try:
                if lost:  # the LocalLeader, and every worker of its group with it
                    return self._reform_group_async(g, f"its LocalLeader {lost}", source)
                ll = self.local_leaders[g]
                call = ll.replace_async.remote(rank, reason, source, self.replacement_origin)
                reply = get_all([call], self.deadlines.replace_s, [f"replacement of worker {rank}"])[0]
                self.events.extend(get_all([ll.take_events.remote()], self.timeout_s, [self._names[g]])[0])
                return {rank: reply[:1]}
            except ray.exceptions.RayActorError as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) or attempt == REPLACE_PASSES:
                    raise
                lost = f"died ({type(exc).__name__})"
        raise AssertionError("unreachable")

    def _reform_group_async(
        self, g: int, reason: str, source: list[ray.ObjectRef]
    ) -> dict[int, list[ray.ObjectRef | None]]:
        """A new LocalLeader and workers for group ``g`` (or the run stops, see ``_reform_group``),
        the workers started from ``source`` at the current step; their new loops by rank."""
        self._reform_group(g, reason)
        ll, ranks = self.local_leaders[g], self.group_ranks[g]
        calls = [
            ll.replace_worker.remote(i, reason, source, self.step, self.replacement_origin, respawn=False)
            for i in range(len(ranks))
        ]
        get_all(calls, self.deadlines.replace_s, [f"new worker {r}" for r in ranks])
        self.events.extend(get_all([ll.take_events.remote()], self.timeout_s, [self._names[g]])[0])
        self._fresh.difference_update(ranks)
        loops = get_all([ll.start_async.remote(*self._async_args)], self.timeout_s, [self._names[g]])[0]
        return {rank: [ref] for rank, ref in zip(ranks, loops)}

    def report(self, group: int, steps: int, best_rank: int, best_estimate: float) -> None:
        with self._lock:
            self._total_steps += steps
            self.step = self._total_steps // self.num_workers
            if best_rank >= 0:
                self.estimates[best_rank] = best_estimate


class DataParallel(PeerCoordinator):
    """Gradients all-reduced every step inside the workers' own torch.distributed group."""

    evaluated = "worker 0 (all workers are equal)"
    collective = True

    def setup(self) -> None:
        self._setup_collective(allreduce_grads=True)

    def _collective_source(self, rank: int, live: list[int], steps: dict[int, int]) -> tuple[list[Any], int, str]:
        return [None], steps[live[0]], f"worker {live[0]}'s weights and optimizer state"

    def _after_reform(self, live: list[int]) -> None:
        # Every worker, survivors too, becomes a replica of one survivor: weights, optimizer
        # state and step count. The survivors may have stopped one step apart (a ring
        # all-reduce can complete on some ranks before a peer's death reaches them), and the
        # replacement needs the momentum too, or its updates would no longer equal theirs.
        handles = self._handles()
        replica = handles[live[0]].replica_state.remote()
        names = [f"worker {r}" for r in range(len(handles))]
        get_all([h.load_replica.remote(replica) for h in handles], self.timeout_s, names)

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        return self._call("train", [(num_steps,)] * self.num_workers)[0]

    def leader_weights(self) -> list[ray.ObjectRef]:
        """Worker 0's weights, as every worker holds the same; if worker 0 does not answer (its
        node lost and not yet declared dead, say: a chaos run's abort, every evaluation's input
        lost), the mean of those that do, which is the same weights."""
        ref = self._handles()[0].get_weights.remote(count=False)
        ((_, died),) = replies_or_deaths([ref], self.timeout_s, ["worker 0"], late_ok=True)
        return [ref] if not died else super().leader_weights()


class LocalSGD(PeerCoordinator):
    """Average within each group every τ steps and over everyone every τ_G steps."""

    collective = True

    def setup(self) -> None:
        self._setup_collective(allreduce_grads=False)

    def _collective_source(self, rank: int, live: list[int], steps: dict[int, int]) -> tuple[list[Any], int, str]:
        # A surviving member of its own group: the group was averaged at most τ steps ago, so
        # its weights are where the lost worker's were, give or take those local steps, and
        # the round's averaging (done again below) pulls it in. Another group's worker only
        # when none of its own is left. A fresh optimizer state, as for LSGD's replacements.
        group = self._locate(rank)[0]
        source = next((r for r in live if self._locate(r)[0] == group), live[0])
        return wrapped_weights(self._handles()[source]), steps[source], f"worker {source}'s weights"

    def _next_step(self, step: int) -> int:
        c = self.cfg.local_sgd
        return local_sgd.next_averaging_step(step, c.tau, c.tau_global)

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        c = self.cfg.local_sgd
        scope = local_sgd.averaging_scope(target, c.tau, c.tau_global)
        return self._call("train", [(num_steps, None, 0.0, None, 0.0, scope)] * self.num_workers)[0]


class DiLoCo(LocalSGD):
    """DiLoCo: an outer step on the averaged pseudo-gradient of one fragment every H/F steps
    (every H without streaming) and, hierarchical, group averages every τ in between. Every
    worker holds the global weights and outer optimizers and takes the same outer step."""

    evaluated = "global weights"

    def _next_step(self, step: int) -> int:
        c = self.cfg.diloco
        return diloco.next_sync_step(step, c.tau, c.tau_global, c.fragments)

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        c = self.cfg.diloco
        scope = "local" if diloco.local_due(target, c.tau, c.tau_global, c.fragments) else None
        fragment = diloco.outer_due(target, c.tau_global, c.fragments)
        return self._call("train", [(num_steps, None, 0.0, None, 0.0, scope, fragment)] * self.num_workers)[0]

    def _collective_source(self, rank: int, live: list[int], steps: dict[int, int]) -> tuple[list[Any], int, str]:
        # the global weights, which every worker holds: where every worker went on from at the
        # last outer step (its outer state follows in the set-up, _share_outer_state)
        source = live[0]
        return [self._handles()[source].global_weights.remote()], steps[source], "the global weights"

    def setup(self) -> None:
        super().setup()
        self._share_outer_state()

    def _share_outer_state(self) -> None:
        """Every worker holds the same global weights and outer optimizers, as DiLoCo needs: at
        every set-up (the run's, and after each re-form) a worker whose copy differs gets that
        of the worker with the most outer steps, and goes on from those global weights. A
        replacement's comes from here; one whose coordinator was lost before it copied it kept
        the initial global weights, and the outer steps of workers holding different ones
        drove a chaos run to chance."""
        handles = self._handles()
        names = [f"worker {r}" for r in range(len(handles))]
        digests = get_all([h.outer_digest.remote() for h in handles], self.timeout_s, names)
        source = max(range(len(handles)), key=lambda r: (digests[r][0], -r))
        stale = [r for r, digest in enumerate(digests) if digest != digests[source]]
        if stale:
            state = handles[source].outer_state.remote()
            get_all(
                [handles[r].restart_from_global.remote(state) for r in stale], self.timeout_s, [names[r] for r in stale]
            )
            self.log.warning(f"worker(s) {stale}: restarted from worker {source}'s global weights and outer state")

    def leader_weights(self) -> list[ray.ObjectRef]:
        """The global weights, which every worker holds: worker 0's or, if it does not answer
        (lost between two rounds: a chaos run's abort, as every retry asked it again), the
        first other worker's that does; none: ``ActorTimeoutError`` (the evaluation waits for
        the next round, which replaces them)."""
        handles = self._handles()
        for ranks in ([0], range(1, len(handles))):  # worker 0 alone first: one copy, as a rule
            refs = [handles[r].global_weights.remote() for r in ranks]
            replies = replies_or_deaths(refs, self.timeout_s, [f"worker {r}" for r in ranks], late_ok=True)
            for ref, (_, died) in zip(refs, replies):
                if not died:
                    return [ref]
        raise ActorTimeoutError(f"no worker answered within {self.timeout_s:g}s: no global weights to evaluate")
