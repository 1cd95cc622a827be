"""What the driver restarts: a coordinator that died (from the last checkpoint, or from the
workers' current weights), and asynchronous loops that ended because their process died (the
coordinator replaces the worker or re-forms its group; the driver takes the new loops).

Workers and groups are repaired by the actors themselves (a LocalLeader replaces its workers,
the coordinator re-forms a group); only the coordinator's own death, and the loops the driver
waits on, are handled here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import ray

from lsgd_ray._internal.driver.base import T
from lsgd_ray._internal.driver.state import RunState
from lsgd_ray._internal.protocol import EveryWorkerLost, Failure, FailureKind, ServerSilent, event_key, groups_out
from lsgd_ray._internal.waiting import answers, get_all
from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.checkpoint import load_latest

# a coordinator that dies while it is being restarted is restarted again, this many times in a
# row: a restart can take tens of seconds on a busy machine, and a chaos run (a strike every 5 s,
# one in six of them the coordinator) killed ten new coordinators in a row before one was up
RESTART_ATTEMPTS = 25
SETUP_ATTEMPTS = 10  # a new coordinator whose set-up met an actor dying meanwhile (a LocalLeader) sets up again
# restores from the checkpoint after every worker was lost, in one supervised call: a loss that
# comes back each time (every worker OOM-killed at the same batch) must end the run
RESTORE_ATTEMPTS = 3


class Supervisor(RunState):
    def _restart_coordinator(self, reason: str) -> None:
        """The coordinator died: start a new one (again, if the new one dies while it starts)."""
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            try:
                return self._start_coordinator_again(reason)
            except ray.exceptions.RayActorError as exc:
                if attempt == RESTART_ATTEMPTS or not self._coordinator_died(exc):
                    raise
                reason = f"died again while restarting ({type(exc).__name__})"

    def _start_coordinator_again(self, reason: str) -> None:
        """A new coordinator, continuing from this run's last checkpoint (the LocalLeaders and
        workers live on, but their state is rolled back to it so every part of the run
        agrees), or, without a checkpoint, from the workers' current weights."""
        for ll in self.local_leaders:  # let a round still running finish; a lost group is handled below
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ll.settle.remote(), timeout=self.deadlines.start_s)
        known = self._events_known  # the dead coordinator's events, as last seen here
        self._leave_out_dropped(known)
        self.global_leader = self._make_coordinator()
        self._continue(reason, known, "coordinator_restarted", f"coordinator {reason}: restarted")

    def _leave_out_dropped(self, known: list[dict[str, Any]]) -> None:
        """The groups that ``known`` shows dropped leave the handles here, which a new
        coordinator is built from: the dead one may have died after this driver read its drop
        but before it read its new handles (the new one then dropped the group again, in CI)."""
        out = groups_out(known)
        if not any(plan.group in out for plan in self.groups):
            return
        by_rank = dict(zip(self._ranks(), self.workers))
        kept = [(plan, ll) for plan, ll in zip(self.groups, self.local_leaders) if plan.group not in out]
        if not kept:  # a coordinator never drops its last group: these handles and events disagree
            raise RuntimeError(f"the run's events show every group dropped ({sorted(out)}): no group to go on with")
        self.groups, self.local_leaders = [plan for plan, _ in kept], [ll for _, ll in kept]
        self.workers = [by_rank[r] for plan in self.groups for r in plan.ranks]

    def _restore_in_place(self, reason: str) -> None:
        """A peer's round lost every worker at once (``EveryWorkerLost``): the same coordinator
        re-forms the lost groups and replaces the workers, and the run's last checkpoint is put
        into every worker; the run goes on from it. Synchronous runs only: their rounds raise it."""
        self._continue(reason, [], "checkpoint_restored", f"{reason}: every worker restarted from the checkpoint")

    def _continue(self, reason: str, known: list[dict[str, Any]], kind: str, done: str) -> None:
        """The coordinator (new, or one whose workers were all lost) revives its groups and
        sets up; then the run goes on from its last checkpoint (or, without one, from the
        workers' current weights). ``known``: a dead coordinator's events, as last seen here;
        ``kind``: the event's; ``done``: what is said of it."""
        cfg = self.config
        # a LocalLeader that the dead coordinator re-formed was owned by it, and died with it:
        # asked, then re-formed one after another, then their workers reset
        d = self.deadlines
        revive_s = d.call_s + len(self.local_leaders) * d.nested_start_s + d.replace_s
        # the workers it revives start at the run's step as last seen here, not at a new
        # coordinator's 0 (with no checkpoint, the run would go on from 0 and overrun its budget)
        ray.get(self.global_leader.set_state.remote({"step": self._step_known}))
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                get_all([self.global_leader.revive_groups.remote()], revive_s, ["coordinator"])
                get_all([self.global_leader.setup.remote()], d.nested_start_s, ["coordinator"])
                break
            except ray.exceptions.RayTaskError as exc:  # an actor it called died or hung meanwhile: revived again
                if attempt == SETUP_ATTEMPTS or not isinstance(exc.cause, ray.exceptions.RayActorError | TimeoutError):
                    raise
                self._say(f"lsgd-ray: an actor died while the coordinator set up ({type(exc.cause).__name__}): again")
        own = self._own_checkpoint()
        # before it re-forms a group lost meanwhile: from the checkpoint if no worker is left
        ray.get(self.global_leader.note_checkpoint.remote(own))
        self._events_seen = 0
        earlier = self.status()["events"]  # the new coordinator re-forms or drops groups lost meanwhile
        self._refresh_handles()  # and workers replaced while it was down have new handles
        earlier = self._events_taken_by_the_dead(known + earlier) + earlier
        event = {"event": kind, "reason": reason, "time": time.time(), "from_checkpoint": None}
        if own:  # workers it lacks or has beyond this run's: see _restore
            state, where = load_latest(own)
            reached = {s["rank"]: s["steps"] for s in self.worker_stats()}
            earlier += self._restore(state, where)
            event["from_checkpoint"] = str(where)
            # the training the run does again: each live worker's steps back to the checkpoint's
            # (a worker the checkpoint lacks restarts at its slowest worker's)
            saved = {w["rank"]: w["steps"] for w in state["workers"]}
            back = {r: saved.get(r, min(saved.values())) for r in reached}
            event["steps_lost"] = sum(max(reached[r] - back[r], 0) for r in reached)
        else:  # no checkpoint yet: go on from the current weights
            stats = self.worker_stats()  # those alive now; the others are replaced at the next round
            if not stats and cfg.algorithm == "lsgd" and cfg.mode == "sync":  # none: repaired first
                ray.get(self.global_leader.repair_groups.remote())
                self._refresh_handles()
                stats = self.worker_stats()
            if not stats:
                raise RuntimeError(f"{done}, and no worker answered: nothing to continue from")
            steps = min(s["steps"] for s in stats)
            event["steps_lost"] = 0  # the workers go on from where they are
            total = steps * len(self.workers) if cfg.mode == "async" else 0  # async counts steps summed
            ray.get(self.global_leader.set_state.remote({"step": steps, "_total_steps": total, "events": []}))
        event["step"] = self.status()["step"]
        events = [*known, *earlier, event]  # a checkpoint's events are a part of those already seen
        ray.get(self.global_leader.set_state.remote({"events": events}))
        self._events_seen, self._events_known = len(events), events
        self._say(f"lsgd-ray: {done}, continuing from step {event['step']}")

    def _own_checkpoint(self) -> str | None:
        """This run's own newest checkpoint (or the one it resumed from), never one that
        another run left in the same output directory."""
        return next((c for c in reversed(self.checkpoints) if os.path.isdir(c)), self.resumed_from)

    def _events_taken_by_the_dead(self, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The LocalLeaders' events that a coordinator took and died with before this driver
        saw them (in the order they happened)."""
        keys = [event_key(e) for e in seen]
        replies = answers([ll.events_not_in.remote(keys) for ll in self.local_leaders], self.config.actor_timeout_s)
        return sorted((e for reply in replies if reply for e in reply), key=lambda e: e["time"])

    def _supervised(self, call: Callable[[], T]) -> T:
        """``call()``; if the coordinator dies meanwhile, it is restarted and ``call`` made again;
        if a round lost every worker, the run goes on from its last checkpoint."""
        restores = 0
        while True:
            try:
                return call()
            except ray.exceptions.RayActorError as exc:
                if not self._coordinator_died(exc):
                    raise
                self._restart_coordinator(f"died ({type(exc).__name__})")
            except ray.exceptions.RayTaskError as exc:
                if not isinstance(exc.cause, EveryWorkerLost):
                    raise
                if self._own_checkpoint() is None:
                    raise RuntimeError(f"{exc.cause}, and this run has no checkpoint yet to continue from") from exc
                restores += 1
                if restores > RESTORE_ATTEMPTS:
                    raise
                try:
                    self._restore_in_place(str(exc.cause))
                except ray.exceptions.RayActorError as died:  # the coordinator too: it restores as it restarts
                    if not self._coordinator_died(died):
                        raise
                    self._restart_coordinator(f"died while restoring ({type(died).__name__})")

    def _coordinator_died(self, exc: ray.exceptions.RayActorError) -> bool:
        """Whether ``exc``, raised by a call between rounds, means the coordinator itself died
        (not an error of its own code or of an actor it waited on). A task that failed because
        an actor it called died may have met one that died with the coordinator (EASGD's and
        DOWNPOUR's ParameterServer, which a worker's loop calls): the coordinator is asked."""
        if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc.cause, ray.exceptions.RayActorError):
            return False
        if not isinstance(exc, ray.exceptions.RayTaskError) and exc.actor_init_failed:
            return False  # its own __init__ raised (CI: 25 new coordinators in a row, each raising the same)
        try:
            ray.get(self.global_leader.local_leader_handles.remote(), timeout=self.config.actor_timeout_s)
            return False
        except ray.exceptions.RayActorError:
            return True

    def _restart_dead_loops(self, loops: dict[int, ray.ObjectRef], ready: list[ray.ObjectRef]) -> bool:
        """Asynchronous mode: loops (by rank) that ended because their process died, or because
        an actor they called died or gave no answer (EASGD's and DOWNPOUR's ParameterServer), are started again by
        the coordinator: a dead worker is replaced on its node, a group whose LocalLeader died is
        re-formed or, its node gone, dropped (its ranks leave ``loops``), a lost server replaced
        and the live workers' loops started again with the new one."""
        rank_of = {ref: rank for rank, ref in loops.items()}
        failed: dict[int, Failure] = {}
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.RayTaskError) as exc:
                if not isinstance(exc, ray.exceptions.RayTaskError):
                    failed[rank_of[ref]] = Failure(rank_of[ref], FailureKind.DIED, type(exc).__name__)
                elif isinstance(exc.cause, ray.exceptions.RayActorError) and self._loops_call_a_server:
                    failed[rank_of[ref]] = Failure(rank_of[ref], FailureKind.LOST_A_CALLEE, type(exc.cause).__name__)
                elif isinstance(exc.cause, ServerSilent):
                    failed[rank_of[ref]] = Failure(rank_of[ref], FailureKind.SERVER_SILENT, f"{exc.cause.wait_s:g}s")
                else:
                    raise  # the worker's own error
        if not failed:
            return False
        self._take_loops(loops, ray.get(self.global_leader.restart_loops.remote(failed)))
        return True

    @property
    def _loops_call_a_server(self) -> bool:
        """Whether the workers' loops call an actor of the coordinator's (EASGD's and DOWNPOUR's
        ParameterServer), which may die on its own."""
        return ALGORITHMS[self.config.algorithm].coordinator_class().loops_call_a_server

    def _take_loops(self, loops: dict[int, ray.ObjectRef], wrapped: dict[int, list[ray.ObjectRef | None]]) -> None:
        """Asynchronous mode: the coordinator's loops by rank (``[ref]``; ``[None]``: the rank's
        group was dropped) into ``loops``, then the events and handles a recovery may have changed."""
        for rank, (ref,) in wrapped.items():
            if ref is None:
                loops.pop(rank, None)
            else:
                loops[rank] = ref
        self.status()  # notes the events first (a restarted coordinator carries them over)
        self._refresh_handles()
