"""The LocalLeader factory as the coordinators hold it: in Ray's object store, loaded on first use.

The factory carries the worker class and the model and dataset factories; loading it imports
torch and the dataset's modules. A coordinator needs it only to re-form a group, so it should
not pay that import while every other actor of the run is starting (on a small machine the
imports of the run's processes are most of its start-up: ``scripts/startup_breakdown.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from lsgd_ray._internal.local_leader import LocalLeaderFactory
    from lsgd_ray.topology import GroupPlan


class DeferredFactory:
    """Behaves as the ``LocalLeaderFactory`` it was made from; unpickling it costs nothing."""

    def __init__(self, factory: LocalLeaderFactory) -> None:
        self._ref = [ray.put(factory)]  # in a list: Ray passes a nested reference as it is
        self._factory: LocalLeaderFactory | None = factory

    def __getstate__(self) -> dict[str, Any]:
        return {"_ref": self._ref, "_factory": None}

    def _loaded(self) -> LocalLeaderFactory:
        if self._factory is None:
            self._factory = ray.get(self._ref[0])
        return self._factory

    def __call__(self, plan: GroupPlan) -> Any:
        return self._loaded()(plan)

    def placed(self, plan: GroupPlan) -> GroupPlan | None:
        return self._loaded().placed(plan)
