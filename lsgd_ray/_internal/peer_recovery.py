"""The synchronous peers' rounds with failures handled in place: a part of the coordinators.

The LocalLeaders report which workers died (or hung) during a round; the coordinator has each
replaced on its node by ``LocalLeader.replace_worker``, the mechanism LSGD uses, started from
the weights its algorithm defines (``_replacement``), and finishes the round with it. Workers in
a torch.distributed group (data-parallel SGD, local SGD) also re-form the group: a process
group cannot take in a new process, so every worker leaves it and all join a new one at a fresh
rendezvous address; then the round goes on from where each worker stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ray

from lsgd_ray._internal.peer_groups import PeerGroups
from lsgd_ray._internal.protocol import EveryWorkerLost, Failure, FailureKind
from lsgd_ray._internal.waiting import ActorTimeoutError, get_all, replies_or_deaths

RECOVER_ATTEMPTS = 3  # a collective group re-formed again when an actor is lost while it re-forms
# passes of one round's recovery (each replaces a lost worker) before the run gives up: at least
# this many, or one per worker and one more (3 were too few for a D-PSGD chaos run with 2 workers
# that lost a node, a LocalLeader, then the new LocalLeader on the removed node, in a row)
ROUND_PASSES = 10

Answers = dict[int, tuple[Any, Any]]  # global rank -> (result, wrapped second return or None)


class PeerRecovery(PeerGroups):
    """The base of ``PeerCoordinator``: failures handled in its synchronous rounds (the
    replacing itself is ``PeerGroups``')."""

    collective = False  # the workers share a torch.distributed group

    def _replacement(self, rank: int, args: tuple) -> tuple[list[Any], tuple, str]:
        """(wrapped weights to start from or ``[None]``, the round's arguments for the new
        worker, the name of those weights) for worker ``rank`` lost in a round called with ``args``."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace a worker in place")

    def _without_lost_inputs(self, rank: int, args: tuple) -> tuple | None:
        """The round's arguments for live worker ``rank`` without the inputs lost with a
        LocalLeader, or ``None``: it cannot go on without them and is replaced."""
        return None

    def _waiting_on_inputs(self, failures: list[Failure]) -> list[Failure]:
        """``failures``, with the workers that did not answer only because an input of theirs
        never came (its producer hung) marked ``LOST_INPUT`` rather than ``HUNG``."""
        return failures

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
                failures = self._with_unseen_deaths(self._waiting_on_inputs(failures))
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
        timeout = self.deadlines.through_leader(
            self.deadlines.collective_s if self.collective else self.deadlines.call_s
        )
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
