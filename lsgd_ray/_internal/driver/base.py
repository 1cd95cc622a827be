"""What every part of the driver shares: the run's actors, its clock and its history.

The ``Trainer`` is built from the parts in this package; each part is a mixin on this base,
which declares the state they share and the few calls all of them make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray

from lsgd_ray._internal.evaluator import Evaluator
from lsgd_ray._internal.schedule import Schedule
from lsgd_ray._internal.waiting import Deadlines, answers, replies_or_deaths
from lsgd_ray.config import TrainConfig
from lsgd_ray.data import DatasetFactory
from lsgd_ray.divergence import DivergenceWatch
from lsgd_ray.models import ModelFactory
from lsgd_ray.results import RunLogger
from lsgd_ray.topology import GroupPlan, Topology

T = TypeVar("T")


class DriverBase:
    """The run's shared state (set by ``Trainer.__init__`` and ``Trainer.start``)."""

    config: TrainConfig
    model_factory: ModelFactory
    dataset_factory: DatasetFactory
    output_dir: str
    schedule: Schedule
    history: list[dict[str, Any]]
    train_s: float
    eval_s: float
    startup_s: float
    checkpoints: list[str]  # written by this process, oldest first
    resumed_from: str | None
    weight_bytes: int
    group_infos: list[dict[str, Any]]
    _begin: float  # when start() was first called: total_s counts from here
    _logger: RunLogger | None
    _watch: DivergenceWatch
    _events_seen: int
    _events_known: list[dict[str, Any]]
    _step_known: int

    topology: Topology | None  # the layout the run started with (set by ``start``)
    # the actors, as the coordinator has them now (a failure may replace or drop some)
    groups: list[GroupPlan]
    local_leaders: list[Any]
    workers: list[Any]
    global_leader: Any  # LSGD's GlobalLeader or a peer's coordinator
    evaluator: Evaluator  # in this process

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(self.config.actor_timeout_s)

    def _say(self, message: str) -> None:
        if not self.config.quiet:
            print(message, flush=True)

    def start(self) -> None:
        raise NotImplementedError

    def _make_coordinator(self) -> Any:
        raise NotImplementedError

    def _supervised(self, call: Callable[[], T]) -> T:
        """``call()``, restarting the coordinator if it dies meanwhile (``Supervisor``)."""
        raise NotImplementedError

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's counters; one that died or hangs at this moment is left out (its
        LocalLeader replaces it at the next round)."""
        stats = answers([w.stats.remote() for w in self.workers], self.config.actor_timeout_s)
        return [s for s in stats if s is not None]

    def status(self) -> dict[str, Any]:
        return self._seen(ray.get(self.global_leader.status.remote()))

    def _seen(self, status: dict[str, Any]) -> dict[str, Any]:
        """Take note of the coordinator's ``status``: new events may mean new handles."""
        new = status["events"][self._events_seen :]
        self._events_seen = len(status["events"])
        self._events_known = status["events"]  # a restarted coordinator takes them over
        self._step_known = status["step"]  # and starts a group it re-forms at once at this step
        if new:  # a worker or a group was replaced or dropped (noted first: the refresh may fail)
            self._refresh_handles()
        return status

    def _refresh_handles(self) -> None:
        """The live LocalLeaders and their workers, as the coordinator has them now. A
        LocalLeader that died and is not re-formed yet (the coordinator does it at its next
        round or loop restart) leaves its workers' old handles here: calls on them fail as on
        any lost worker's."""
        old = dict(zip([r for g in self.groups for r in g.ranks], self.workers))
        self.groups, self.local_leaders = ray.get(self.global_leader.groups_now.remote())
        calls = [ll.worker_handles.remote() for ll in self.local_leaders]
        replies = replies_or_deaths(calls, self.config.actor_timeout_s, [f"LocalLeader {p.group}" for p in self.groups])
        workers: list[Any] = []
        for plan, (handles, died) in zip(self.groups, replies):
            if died and not all(r in old for r in plan.ranks):
                raise RuntimeError(f"LocalLeader {plan.group} {died}, and its workers are not known here")
            workers += [old[r] for r in plan.ranks] if died else handles
        self.workers = workers
