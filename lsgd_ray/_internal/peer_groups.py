"""The peers' workers and groups replaced: a part of their coordinators (``PeerRecovery``
builds on it). A lost worker is replaced on its node by its LocalLeader
(``LocalLeader.replace_worker``, the mechanism LSGD uses), from the weights the caller names; a
group whose LocalLeader died gets a new LocalLeader and new workers, on its node or, the node
lost, on another with room (the peers cannot go on with fewer workers); the lost are found by
asking every LocalLeader and probing every worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray._internal.protocol import Failure, FailureKind
from lsgd_ray._internal.waiting import LATE, get_all, replies_or_deaths

if TYPE_CHECKING:
    from lsgd_ray.topology import GroupPlan

REFORM_ATTEMPTS = 3  # a new LocalLeader that dies before it is ready (its node lost too) is made again
REFORM_PAUSE_S = 2.0  # before the next attempt: time for the cluster to mark a removed node dead
REPLACE_PASSES = 3  # replacements made again when a LocalLeader died meanwhile (its group re-formed)
FIND_PASSES = 3  # the search for lost workers made again when a LocalLeader died amid it


class PeerGroups(Coordinator):
    """The base of ``PeerRecovery``: lost workers replaced, dead groups re-formed."""

    # what the PeerCoordinator provides
    group_ranks: list[list[int]]
    _fresh: set[int]  # ranks whose worker is a new process not yet restarted
    _worker_handles: list[Any] | None  # cached; None: ask the LocalLeaders again
    _handles: Callable[[], list[Any]]  # every worker's handle, by global rank

    def _group_lost(self, g: int) -> None:
        """Group ``g``'s LocalLeader died: what it owned (the weights its group published) is gone."""

    def _find_lost(self) -> list[Failure]:
        """Every worker to restart, found by asking: each group whose LocalLeader died is
        re-formed (its new workers are to be restarted), and every other worker is probed
        (dead, or hung past the timeout)."""
        self._worker_handles = None  # a recovery cut short may have replaced some meanwhile
        why: dict[int, str] = {}
        for attempt in range(1, FIND_PASSES + 1):
            for g, died in self._reform_dead_groups().items():
                why.update((r, died) for r in self.group_ranks[g])
            try:
                handles = self._handles()
                break
            except ray.exceptions.RayActorError as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) or attempt == FIND_PASSES:
                    raise
                # a LocalLeader died since it answered (a new one, struck at once: a chaos
                # run's abort): the next pass finds it and re-forms its group
        # the new workers of the groups re-formed now, or in a recovery that was cut short
        lost = [Failure(r, FailureKind.GROUP_LOST, why.get(r, "was replaced")) for r in sorted(self._fresh)]
        others = [r for r in range(self.num_workers) if r not in self._fresh]
        names = [f"worker {r}" for r in others]
        probes = replies_or_deaths([handles[r].ready.remote() for r in others], self.timeout_s, names, late_ok=True)
        return lost + [
            Failure(r, FailureKind.HUNG, f"{self.timeout_s:g}s")
            if died == LATE
            else Failure(r, FailureKind.DIED, died.removeprefix("died (").removesuffix(")"))  # the error's name
            for r, (_, died) in zip(others, probes)
            if died
        ]

    def _reform_group(self, g: int, reason: str) -> None:
        """A new LocalLeader for group ``g``, whose LocalLeader died: it starts new workers on the
        node, which the caller restarts as lost workers (``_fresh``); or the run stops."""
        plans = self.plans
        if not plans or self.make_local_leader is None:
            raise RuntimeError(f"LocalLeader {g}: {reason}; continue the run with --resume")
        self._group_lost(g)
        plan = plans[g]
        replacement, target = self._new_local_leader(g, plan, reason)
        self.local_leaders[g], plans[g] = replacement, target
        self._worker_handles = None
        self._fresh.update(self.group_ranks[g])
        self.events.append(
            {
                "event": "group_replaced",
                "group": g,
                "ranks": list(self.group_ranks[g]),
                "reason": reason,
                "step": self.step,
                "node_id": target.node_id,
                "time": time.time(),
            }
        )
        where = "its node" if target == plan else f"node {target.node_id[:8]} (its own was lost)"
        self.log.warning(f"LocalLeader {g}: {reason}: a new one and new workers on {where}")

    def _new_local_leader(self, g: int, plan: GroupPlan, reason: str) -> tuple[Any, GroupPlan]:
        """A new LocalLeader for group ``g``, ready, and where it runs: ``plan``'s node, or
        another with room if that node was lost."""
        assert self.make_local_leader is not None
        for attempt in range(1, REFORM_ATTEMPTS + 1):
            target = self.make_local_leader.placed(plan, self.plans)
            if target is None:
                raise RuntimeError(
                    f"LocalLeader {g}: {reason} with its node, and no live node has the free resources for its "
                    f"{plan.num_workers} worker(s); {type(self).__name__} cannot go on with fewer workers: "
                    "continue the run with --resume on a cluster that has them"
                )
            replacement = self.make_local_leader(target, self.last_checkpoint)
            try:
                get_all([replacement.ready.remote()], self.deadlines.nested_start_s, [f"new LocalLeader {g}"])
                return replacement, target
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
                # its node was lost too (one removed is still listed alive for a moment: it died,
                # or was unschedulable, which ended a DiLoCo chaos run): again, placed anew
                if isinstance(exc, ray.exceptions.RayTaskError) or attempt == REFORM_ATTEMPTS:
                    raise
                self.log.warning(f"new LocalLeader {g} was lost before it was ready ({type(exc).__name__}): again")
                time.sleep(REFORM_PAUSE_S)
        raise AssertionError("unreachable")

    def _with_unseen_deaths(self, failures: list[Failure]) -> list[Failure]:
        """``failures``, with the workers of each group whose LocalLeader died unseen: a retry
        calls only the groups that failed, and an input lost (``LOST_INPUT``) may be owned by
        another, dead since it answered (a D-PSGD chaos run's abort: the same lost input handed
        out again and again). Each such group is re-formed, which marks what it owned lost."""
        if not any(f.kind is FailureKind.LOST_INPUT for f in failures):
            return failures
        for g, died in self._reform_dead_groups().items():
            ranks = self.group_ranks[g]
            failures = [f for f in failures if f.rank not in ranks]
            failures += [Failure(rank, FailureKind.GROUP_LOST, died) for rank in ranks]
        return failures

    def _reform_dead_groups(self) -> dict[int, str]:
        """Ask every LocalLeader and re-form each group whose LocalLeader died: {group: how it died}."""
        calls = [ll.worker_handles.remote() for ll in self.local_leaders]
        replies = replies_or_deaths(calls, self.timeout_s, self._names)
        dead = {g: died for g, (_, died) in enumerate(replies) if died}
        for g, died in dead.items():
            self._reform_group(g, f"its LocalLeader {died}")
        return dead

    def _locate(self, rank: int) -> tuple[int, int]:
        """(group, index in the group) of global ``rank``."""
        g = next(g for g, ranks in enumerate(self.group_ranks) if rank in ranks)
        return g, rank - self.group_ranks[g][0]

    def _replace(self, failed: list[Failure], sources: dict[int, tuple[list[Any], int, str]]) -> list[Failure]:
        """Replace the worker of each of ``failed`` on its node, from ``sources[rank]``:
        (wrapped weights, step count, their name); the events go into this run's. Returns
        the workers of the groups whose LocalLeader died meanwhile (each re-formed: its new
        workers are to be restarted in turn)."""
        calls, owners = [], []
        for f in failed:
            g, index = self._locate(f.rank)
            source, steps, origin = sources[f.rank]
            respawn = f.rank not in self._fresh
            calls.append(
                self.local_leaders[g].replace_worker.remote(index, f.reason, source, steps, origin, respawn=respawn)
            )
            owners.append(g)
        names = [f"replacement of worker {f.rank}" for f in failed]
        self._worker_handles = None  # the new workers have new handles (also if this wait fails)
        replies = replies_or_deaths(calls, self.deadlines.replace_s, names)
        dead = {g: died for g, (_, died) in zip(owners, replies) if died}
        # the replacements' events; a LocalLeader that died since it answered (a D-PSGD chaos
        # run's abort) is re-formed as one that died while replacing
        groups = sorted(set(owners) - set(dead))
        calls = [self.local_leaders[g].take_events.remote() for g in groups]
        taken = replies_or_deaths(calls, self.timeout_s, [self._names[g] for g in groups])
        for g, (events, died) in zip(groups, taken):
            if died:
                dead[g] = died
            else:
                self.events.extend(events)
        self._fresh.difference_update(f.rank for f, g in zip(failed, owners) if g not in dead)
        lost = []
        for g, died in dead.items():
            self._reform_group(g, f"its LocalLeader {died} while its workers were replaced")
            lost += [Failure(rank, FailureKind.GROUP_LOST, died) for rank in self.group_ranks[g]]
        return lost

    def _replace_all(self, failed: list[Failure], source_of: Callable[[int], tuple[list[Any], int, str]]) -> None:
        """``_replace`` until every lost worker is replaced: a group whose LocalLeader died
        meanwhile is re-formed and its workers restarted in turn (each from ``source_of(rank)``)."""
        for _ in range(REPLACE_PASSES):
            failed = self._replace(failed, {f.rank: source_of(f.rank) for f in failed})
            if not failed:
                return
        raise RuntimeError("LocalLeaders keep dying while their workers are replaced; continue the run with --resume")
