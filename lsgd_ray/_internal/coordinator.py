"""What LSGD's GlobalLeader and the peers' coordinators share: the LocalLeaders they drive with
the plans to re-form their groups, the run's events, the counters a checkpoint carries, and the
driver's questions about the layout."""

from __future__ import annotations

import copy
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from lsgd_ray._internal.group_repair import checkpoint_source
from lsgd_ray._internal.protocol import actor_log
from lsgd_ray._internal.waiting import Deadlines, answers

if TYPE_CHECKING:
    from lsgd_ray._internal.local_leader import LocalLeaderFactory
    from lsgd_ray.config import TrainConfig
    from lsgd_ray.topology import GroupPlan


class Coordinator:
    # the workers' asynchronous loops call an actor of this coordinator's (a ParameterServer):
    # a loop that fails because that actor died is restarted, not taken for the worker's error
    loops_call_a_server = False
    # what a checkpoint carries (subclasses add theirs)
    STATE: tuple[str, ...] = (
        "step",
        "rounds",
        "estimates",
        "round_wall_s",
        "round_compute_s",
        "events",
        "_total_steps",
    )

    def __init__(
        self,
        local_leaders: list[Any],
        plans: list[GroupPlan],
        config: TrainConfig,
        timeout_s: float,
        make_local_leader: LocalLeaderFactory | None = None,
    ) -> None:
        if not plans or len(plans) != len(local_leaders):
            raise ValueError(
                f"a coordinator needs a LocalLeader for each of its groups: {len(local_leaders)} for {plans}"
            )
        self.local_leaders, self.plans, self.timeout_s = list(local_leaders), list(plans), timeout_s
        self.config = config
        self.deadlines = Deadlines(timeout_s)
        # a LocalLeader that dies is replaced from its plan, on its node or, the node lost, on
        # another with room for its workers
        self.make_local_leader = make_local_leader
        self.log = actor_log(type(self).__name__)
        self.group_sizes = [p.num_workers for p in self.plans]
        self.num_workers = sum(self.group_sizes)
        self._names = [f"LocalLeader {g}" for g in range(len(self.local_leaders))]
        self.step = 0  # steps taken by each worker
        self.rounds = 0
        # by global rank, which stays that of the run's start when groups are dropped
        self.estimates = [math.inf] * max(p.first_rank + p.num_workers for p in self.plans)
        self.round_wall_s = 0.0
        self.round_compute_s = 0.0
        self.events: list[dict[str, Any]] = []  # failures handled: replaced workers, resets, ...
        self._total_steps = 0  # asynchronous: steps summed over all workers
        self._lock = threading.Lock()
        self._async_args: tuple = ()
        self.last_checkpoint: str | None = None  # the run's newest (note_checkpoint)
        self._init_state()

    def _init_state(self) -> None:
        """The subclass's own state, set up at the end of ``__init__``."""

    def setup(self) -> None:
        """Anything the algorithm needs before its first step (collectives, a parameter server)."""

    def revive_groups(self) -> None:
        """Called on a coordinator that replaces a dead one, before ``setup``: re-form the groups
        whose LocalLeader died meanwhile. LSGD's GlobalLeader does that at its first ``status``
        (it may drop a group instead); the peers, which need every group, before their setup."""

    def get_state(self) -> dict[str, Any]:
        """Counters, histories and events for a checkpoint (taken between rounds)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.STATE}

    def set_state(self, state: dict[str, Any]) -> None:
        for name in self.STATE:
            if name in state:
                setattr(self, name, state[name])

    def note_checkpoint(self, path: str | None) -> None:
        """The run's newest checkpoint, as the driver wrote (or resumed from) it: where a group
        left with no live worker anywhere restarts from, and (told to every LocalLeader) a
        worker whose every other source of weights was lost."""
        self.last_checkpoint = path
        # a LocalLeader dead now gets the path when it is re-formed
        answers([ll.note_checkpoint.remote(path) for ll in self.local_leaders], self.timeout_s)

    def _checkpoint_source(self, rank: int | None = None) -> tuple[list[Any], str]:
        """No live worker to restart from: ``checkpoint_source`` of the run's newest checkpoint."""
        return checkpoint_source(self.last_checkpoint, rank, self.log)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)

    def local_leader_handles(self) -> list[Any]:
        return list(self.local_leaders)

    def groups_now(self) -> tuple[list[GroupPlan], list[Any]]:
        """The groups in the run now (LSGD drops a group no node can take; the peers never do)
        and their LocalLeaders, in one answer that pairs them: a group dropped or rejoining
        changes both lists one after the other, in another thread of this actor's, and two calls
        read between them paired a group with another's LocalLeader."""
        while True:
            plans, leaders = list(self.plans), list(self.local_leaders)
            if len(plans) == len(leaders):
                return plans, leaders
            time.sleep(0.001)
