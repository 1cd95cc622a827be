"""The driver side of a run: ``fit`` is the one-call API; ``Trainer`` exposes the same run step
by step (start, rounds, worker weights, evaluation) for notebooks and tests.

The Trainer creates and stops the actors; its parts live in ``lsgd_ray/_internal/driver/``
(placement, loops, supervisor, state, records).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import ray
import torch

from lsgd_ray._internal.driver.loops import Loops
from lsgd_ray._internal.driver.placement import connect, on_driver_node, place
from lsgd_ray._internal.driver.state import resumed_run_dir
from lsgd_ray._internal.evaluator import Evaluator
from lsgd_ray._internal.local_leader import LEADER_CONCURRENCY, LocalLeaderFactory
from lsgd_ray._internal.protocol import Unopened, WorkerSpec, actor_class
from lsgd_ray._internal.schedule import Schedule
from lsgd_ray._internal.waiting import get_all
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.config import TrainConfig
from lsgd_ray.data import DatasetFactory
from lsgd_ray.divergence import DivergenceWatch
from lsgd_ray.models import ModelFactory
from lsgd_ray.optim import OptimizerFactory
from lsgd_ray.results import FitResult, RunLogger, write_json
from lsgd_ray.topology import Topology


class Trainer(Loops):
    """One LSGD run on Ray.

    ``model_factory`` and ``dataset_factory`` are picklable zero-argument callables; they run
    inside every worker (and here, for the test split). ``optimizer_factory(params)`` overrides the
    optimizer described by ``config.optimizer`` (any ``torch.optim`` optimizer).

    This class starts and stops a run's actors; the loops, the supervision of the coordinator,
    checkpoints and records are its bases in ``lsgd_ray/_internal/driver/``.
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        dataset_factory: DatasetFactory,
        config: TrainConfig,
        *,
        optimizer_factory: OptimizerFactory | None = None,
        run_name: str = "lsgd",
        worker_cls: type = Worker,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.model_factory, self.dataset_factory, self.config = model_factory, dataset_factory, config
        self.optimizer_factory, self.worker_cls = optimizer_factory, worker_cls
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.output_dir = (
            config.output_dir or resumed_run_dir(config.resume) or os.path.join("runs", f"{run_name}-{stamp}")
        )
        self.topology: Topology | None = None
        self.history: list[dict[str, Any]] = []
        self.train_s = self.eval_s = self.startup_s = 0.0
        self._owns_ray = False
        self._started = False
        self._begin = 0.0  # when start() was first called: total_s counts from here
        self._logger: RunLogger | None = None
        self.resumed_from: str | None = None
        self.checkpoints: list[str] = []  # written by this process, oldest first
        self.schedule = Schedule(
            config.eval_every_s,
            config.time_budget_s,
            checkpoint_every_s=config.checkpoint_every_s,
            checkpoint_every_steps=config.checkpoint_every_steps,
        )
        self._events_seen = 0
        self._events_known: list[dict[str, Any]] = []
        self._step_known = 0
        self._watch = DivergenceWatch(chance=0.0)  # set from the test set's classes in start()

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def start(self) -> None:
        """Connect to Ray, check the placement, create and wait for every actor."""
        if self._started:
            return
        cfg, begin = self.config, time.perf_counter()
        self._begin = self._begin or begin
        self._owns_ray = connect(cfg) or self._owns_ray
        self.topology = topo = place(cfg)
        self._say(
            f"lsgd-ray: {cfg.algorithm}, {len(topo.groups)} group(s) x {topo.group_sizes} worker(s), "
            f"{cfg.mode} mode, {ALGORITHMS[cfg.algorithm].summary(cfg)}"
        )
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, "config.json"), cfg.to_dict())
        spec = WorkerSpec(
            num_workers=topo.num_workers,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            lsgd=cfg.lsgd,
            optimizer=cfg.optimizer,
            cpus=cfg.cpus_per_worker,
            gpus=cfg.gpus_per_worker,
            num_groups=len(topo.groups),
            redeal_shards=cfg.redeal_shards,
            diloco=cfg.diloco if cfg.algorithm == "diloco" else None,
            comm_dtype=cfg.comm_dtype,
            data_parallel=cfg.data_parallel if cfg.algorithm == "data_parallel" else None,
            step_delay_s=dict(cfg.straggler_delay_s),
            collective_timeout_s=cfg.actor_timeout_s,
        )
        self._make_local_leader = LocalLeaderFactory(  # the factories unpickled in the Workers only
            spec,
            Unopened.put(self.model_factory),
            Unopened.put(self.dataset_factory),
            Unopened.put(self.optimizer_factory),
            self.worker_cls,
            cfg.actor_timeout_s,
        )
        self.groups = list(topo.groups)  # the groups still in the run (a dropped one leaves)
        self.local_leaders = [self._make_local_leader(plan) for plan in self.groups]
        self.global_leader = self._make_coordinator()
        # in this process, while the actors' processes start (docs/architecture.md#start-up)
        self.evaluator = Evaluator(
            self.model_factory, self.dataset_factory, cfg.eval_batch_size, cfg.gpus_per_worker > 0, cfg.mode == "sync"
        )
        infos = get_all(
            [ll.ready.remote() for ll in self.local_leaders],
            self.deadlines.nested_start_s,
            [f"LocalLeader {g.group}" for g in topo.groups],
            hint="actors could not be placed or failed to start",
        )
        self.group_infos = infos
        self.workers = [h for g in ray.get([ll.worker_handles.remote() for ll in self.local_leaders]) for h in g]
        get_all(
            [self.global_leader.setup.remote()],
            self.deadlines.nested_start_s,
            [f"{cfg.algorithm} coordinator"],
        )
        worker_infos = [w for g in self.group_infos for w in g["workers"]]
        self.weight_bytes = worker_infos[0]["nbytes"]
        shard = min(w["shard_size"] for w in worker_infos)
        limits = [cfg.max_steps or math.inf]
        if cfg.epochs is not None:
            limits.append(math.ceil(cfg.epochs * shard / cfg.batch_size))
        self.schedule.max_step = min(limits)
        self.steps_per_epoch = shard / cfg.batch_size
        # a model no better than a constant answer after two epochs has learned nothing
        self._watch = DivergenceWatch(**self.evaluator.baseline(), min_steps=2 * self.steps_per_epoch)
        if cfg.resume:
            self._resume(cfg.resume)
        self._logger = RunLogger(self.output_dir)
        self.startup_s = time.perf_counter() - begin
        self._started = True
        self._say(
            f"lsgd-ray: {topo.num_workers} workers ready in {self.startup_s:.1f}s "
            f"({infos[0]['workers'][0]['num_params']:,} parameters, {shard} samples per worker shard)"
        )

    def _make_coordinator(self) -> Any:
        """The algorithm's coordinator (LSGD's GlobalLeader, or a peer's in its role), on the
        driver's node."""
        cfg = self.config
        options = dict(num_cpus=0, max_concurrency=LEADER_CONCURRENCY, scheduling_strategy=on_driver_node())
        coordinator = ALGORITHMS[cfg.algorithm].coordinator_class()
        return actor_class(coordinator, **options).remote(
            self.local_leaders, self.groups, cfg, cfg.actor_timeout_s, self._make_local_leader
        )

    def worker_weights(self) -> list[np.ndarray]:
        """Every worker's flat weights (parameters then float buffers), by global rank."""
        return ray.get([w.get_weights.remote(count=False) for w in self.workers])

    def fit(self) -> FitResult:
        """Train to the budget, evaluating every ``eval_every_s`` training seconds (LSGD: the leader
        and the center)."""
        error = None
        try:
            self.start()
            if self.config.mode == "sync":
                self._fit_sync()
            else:
                self._fit_async()
            if self.config.mode != "sync" or not self._evaluation_ends_run():  # else it was just evaluated
                self._supervised(self.evaluate_leader)
        except BaseException as exc:  # keep what we have, then re-raise
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._write_result(error)
            raise
        return self._write_result(error)

    def shutdown(self) -> None:
        """Stop every actor this run started (and the embedded Ray, if this run started it)."""
        if self._logger:
            self._logger.close()
            self._logger = None
        actors = [*getattr(self, "workers", []), *getattr(self, "local_leaders", [])]
        actors.append(getattr(self, "global_leader", None))
        for handle in actors:
            if handle is not None:
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(handle)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._started = False


def fit(
    model_factory: ModelFactory,
    dataset_factory: DatasetFactory,
    config: TrainConfig,
    *,
    optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None,
    run_name: str = "lsgd",
) -> FitResult:
    """Train with ``config.algorithm`` (LSGD by default) on Ray and return the result (also written to ``config.output_dir``)."""
    with Trainer(
        model_factory, dataset_factory, config, optimizer_factory=optimizer_factory, run_name=run_name
    ) as trainer:
        return trainer.fit()
