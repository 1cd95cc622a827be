"""The synchronous peers' rounds with failures handled in place: a part of the coordinators.

The LocalLeaders report which workers died (or hung) during a round; the coordinator has each
replaced on its node by ``LocalLeader.replace_worker``, the mechanism LSGD uses, started from
the weights its algorithm defines (``_replacement``), and finishes the round with it. Workers in
a torch.distributed group (data-parallel SGD, local SGD) also re-form the group: a process
group cannot take in a new process, so every worker leaves it and all join a new one at a fresh
rendezvous address; then the round goes on from where each worker stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import ray

from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray._internal.protocol import EveryWorkerLost, Failure, FailureKind
from lsgd_ray._internal.waiting import LATE, ActorTimeoutError, get_all, replies_or_deaths

if TYPE_CHECKING:
    from lsgd_ray.topology import GroupPlan

REFORM_ATTEMPTS = 3  # a new LocalLeader that dies before it is ready (its node lost too) is made again
REFORM_PAUSE_S = 2.0  # before the next attempt: time for the cluster to mark a removed node dead
REPLACE_PASSES = 3  # replacements made again when a LocalLeader died meanwhile (its group re-formed)
RECOVER_ATTEMPTS = 3  # a collective group re-formed again when an actor is lost while it re-forms
FIND_PASSES = 3  # the search for lost workers made again when a LocalLeader died amid it
# passes of one round's recovery (each replaces a lost worker) before the run gives up: at least
# this many, or one per worker and one more (3 were too few for a D-PSGD chaos run with 2 workers
# that lost a node, a LocalLeader, then the new LocalLeader on the removed node, in a row)
ROUND_PASSES = 10

Answers = dict[int, tuple[Any, Any]]  # global rank -> (result, wrapped second return or None)


class PeerRecovery(Coordinator):
    """The base of ``PeerCoordinator``: failures handled in its synchronous rounds."""

    # what the PeerCoordinator provides
    group_ranks: list[list[int]]
    _fresh: set[int]  # ranks whose worker is a new process not yet restarted
    _worker_handles: list[Any] | None  # cached; None: ask the LocalLeaders again
    _handles: Callable[[], list[Any]]  # every worker's handle, by global rank

    collective = False  # the workers share a torch.distributed group

    def _replacement(self, rank: int, args: tuple) -> tuple[list[Any], tuple, str]:
        """(wrapped weights to start from or ``[None]``, the round's arguments for the new
        worker, the name of those weights) for worker ``rank`` lost in a round called with ``args``."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace a worker in place")

    def _without_lost_inputs(self, rank: int, args: tuple) -> tuple | None:
        """The round's arguments for live worker ``rank`` without the inputs lost with a
        LocalLeader, or ``None``: it cannot go on without them and is replaced."""
        return None

    def _group_lost(self, g: int) -> None:
        """Group ``g``'s LocalLeader died: what it owned (the weights its group published) is gone."""

    def _call(self, method: str, args: list[tuple], num_returns: int = 1) -> tuple[list[Any], list[Any]]:
        """``method`` on every worker (``args`` by global rank) through the LocalLeaders:
        (results, wrapped second returns) by rank. Workers lost meanwhile are replaced and
        their part of the round done again by the new ones."""
        answers, failures = self._call_ranks(method, dict(enumerate(args)), num_returns)
        replaced: set[int] = set()  # ranks retried with a replacement's arguments, not the round's
        # a collective that broke on every member with none lost (each timed out waiting on the
        # other: a local SGD chaos run's abort, amid strikes on a node and a coordinator) is
        # formed again and the round done once more; a worker's own error breaks it again, and
        # is raised then (``_raise_if_only_broken``)
        for _ in range(max(len(args) + 1, ROUND_PASSES)):  # each replaces a worker (or re-forms a collective once)
            if not failures:
                break
            if self.collective:
                answers, failures = self._recover_collective(method, args, _lost(failures))
                _raise_if_only_broken(method, failures, " after the group was re-formed")
            else:
                # a live worker that lost an input (its owner, a LocalLeader, died) goes on, if the
                # algorithm can do without that input; the others are replaced. A replacement is
                # replaced again: its own weights are not the ones the round's arguments mix.
                failures = self._with_unseen_deaths(failures)
                kept = {
                    f.rank: self._without_lost_inputs(f.rank, args[f.rank])
                    for f in failures
                    if f.kind is FailureKind.LOST_INPUT and f.rank not in replaced
                }
                alive = {rank: a for rank, a in kept.items() if a is not None and rank not in self._fresh}
                retry = self._replace_lost([f for f in failures if f.rank not in alive], args)
                replaced.update(retry)
                again, failures = self._call_ranks(method, {**retry, **alive}, num_returns)
                answers.update(again)
        else:
            raise RuntimeError(f"workers keep failing in {method}; continue the run with --resume")
        ranks = range(len(args))
        return [answers[r][0] for r in ranks], [answers[r][1] for r in ranks]

    def _call_ranks(self, method: str, args: dict[int, tuple], num_returns: int) -> tuple[Answers, list[Failure]]:
        """``method`` on the workers named in ``args`` (global rank -> arguments): their answers,
        and the failures of those that gave none (by global rank)."""
        by_group: dict[int, tuple[list[int], list[tuple]]] = {}
        for rank, a in args.items():
            g, index = self._locate(rank)
            by_group.setdefault(g, ([], []))
            by_group[g][0].append(index)
            by_group[g][1].append(a)
        calls = [
            self.local_leaders[g].call_workers.remote(method, a, num_returns, indexes, self.collective)
            for g, (indexes, a) in by_group.items()
        ]
        # the LocalLeaders wait at most (twice, for collectives) the timeout for their workers
        timeout = self.deadlines.group_collective_s if self.collective else self.deadlines.group_call_s
        replies = replies_or_deaths(calls, timeout, [f"LocalLeader {g}" for g in by_group])
        answers: Answers = {}
        failures: list[Failure] = []
        for (g, (indexes, _)), (reply, died) in zip(by_group.items(), replies):
            if died:  # its workers died with it: a new LocalLeader and workers, each restarted as a lost worker
                lost = [Failure(self.group_ranks[g][i], FailureKind.GROUP_LOST, died) for i in indexes]
                self._reform_group(g, lost[0].reason)
                failures += lost
                continue
            refs = reply.refs or [None] * len(indexes)
            for index, result, ref in zip(indexes, reply.results, refs):
                answers[self.group_ranks[g][index]] = (result, ref)
            failures += reply.failures
        return answers, failures

    def revive_groups(self) -> None:
        """A new coordinator's first act, before ``setup`` (and again if an actor dies during
        its set-up): a group whose LocalLeader the dead coordinator had re-formed (and owned) is
        re-formed. Every worker lost meanwhile restarts at a live worker's step (a new
        coordinator's own is 0), as the rounds restart one: from a live worker's weights; a
        collective's member from ``_collective_source`` (DiLoCo's global weights and outer state:
        with a worker's local weights, its global weights stayed the initial ones and a chaos
        run without a checkpoint to restore went to chance). Then the driver restores the
        checkpoint, if any, into every worker."""
        lost = self._find_lost()
        if not lost:
            return
        live = _live(range(self.num_workers), lost)
        if not live:
            self._replace_all(lost, lambda rank: ([None], self.step, "the initial weights"))
            return
        if self.collective:
            self._replace_members(lost, live)
            self._after_reform(live)
            return
        source = live[0]
        steps, weights = self._live_steps([source])[source], wrapped_weights(self._handles()[source])
        self._replace_all(lost, lambda rank: (weights, steps, f"worker {source}'s weights"))

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

    # ------------------------------------------------------------------ object-store peers

    def _replace_lost(self, failed: list[Failure], args: list[tuple]) -> dict[int, tuple]:
        """Replace the lost workers (and those of a LocalLeader that died meanwhile); returns
        the round's arguments for each new one."""
        plans: dict[int, tuple[list[Any], tuple, str]] = {}

        def source_of(rank: int) -> tuple[list[Any], int, str]:
            plans[rank] = self._replacement(rank, args[rank])
            return plans[rank][0], self.step, plans[rank][2]

        self._replace_all(failed, source_of)
        return {rank: retry for rank, (_, retry, _) in plans.items()}

    # ------------------------------------------------------------------ collectives

    def _collective_source(self, rank: int, live: list[int], steps: dict[int, int]) -> tuple[list[Any], int, str]:
        """Where a lost member of the collective restarts (wrapped weights, steps, name)."""
        raise NotImplementedError

    def _after_reform(self, live: list[int]) -> None:
        """Anything the re-formed group needs before it goes on (data-parallel: one replica)."""

    def _recover_collective(
        self, method: str, args: list[tuple], failed: list[Failure]
    ) -> tuple[Answers, list[Failure]]:
        """Replace the lost workers, re-form the group with everyone, and finish the round:
        each worker takes the steps it has left (its first argument is the round's step count).
        An actor lost meanwhile (a survivor, a replacement, a LocalLeader whose node went) is
        found and replaced in turn, and the group formed again."""
        live = _live(range(len(args)), failed)
        pending = failed  # to replace: kept until replaced, as a hung one answers a probe
        for attempt in range(1, RECOVER_ATTEMPTS + 1):
            live = _live(live, pending)
            if not live:
                raise EveryWorkerLost("every worker of the collective group was lost")
            try:
                self._replace_members(pending, live)
                pending = []
                self.setup()  # everyone leaves the broken group and joins one at a fresh address
                self._after_reform(live)
                handles = self._handles()
                everyone = [f"worker {r}" for r in range(len(handles))]
                now = get_all([h.stats.remote() for h in handles], self.timeout_s, everyone)
                break
            except (ray.exceptions.RayError, ActorTimeoutError) as exc:
                found = self._find_lost()  # none, and none pending: a worker's own error
                if not (found or pending) or attempt == RECOVER_ATTEMPTS:
                    raise
                pending = list({f.rank: f for f in [*pending, *found]}.values())
                ranks = ", ".join(str(f.rank) for f in pending)
                self.log.warning(f"{_what(exc)} while the collective group re-formed; worker(s) {ranks} lost: again")
        target = self.step + args[0][0]
        retry = {r: (max(target - s["steps"], 0), *args[r][1:]) for r, s in enumerate(now)}
        self.log.warning(f"collective group re-formed with {len(now)} workers; the round goes on")
        return self._call_ranks(method, retry, 1)

    def _replace_members(self, failed: list[Failure], live: list[int]) -> None:
        """Replace the lost members of the collective from the ``live`` ones (``_collective_source``)."""
        steps = self._live_steps(live)
        self._replace_all(failed, lambda rank: self._collective_source(rank, live, steps))

    def _live_steps(self, live: list[int]) -> dict[int, int]:
        """The steps each of the ``live`` workers has taken, by rank."""
        handles, names = self._handles(), [f"worker {r}" for r in live]
        stats = get_all([handles[r].stats.remote() for r in live], self.timeout_s, names)
        return {r: s["steps"] for r, s in zip(live, stats)}


def _live(ranks: Iterable[int], failed: list[Failure]) -> list[int]:
    """``ranks`` without those of ``failed``."""
    lost = {f.rank for f in failed}
    return [r for r in ranks if r not in lost]


def _what(exc: Exception) -> str:
    """An error met during a recovery, in a few words: the actor error it stands for."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    return type(cause).__name__


def _lost(failures: list[Failure]) -> list[Failure]:
    """The workers to replace: all but those whose collective broke with a lost peer."""
    return [f for f in failures if f.kind is not FailureKind.BROKEN]


def _raise_if_only_broken(method: str, failures: list[Failure], when: str) -> None:
    """Collectives broke but no worker was lost: a worker's own error, which no replacement mends."""
    if failures and not _lost(failures):
        errors = "; ".join(f"worker {f.rank}: {f.detail}" for f in failures)
        raise RuntimeError(f"{method} failed{when}: {errors}")


def wrapped_weights(handle: Any) -> list[ray.ObjectRef]:
    """A worker's current weights, by reference (wrapped), not counted as the algorithm's traffic."""
    return [handle.get_weights.remote(count=False)]
