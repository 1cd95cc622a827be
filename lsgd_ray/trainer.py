"""The driver side of a run: connect to Ray, place the actors, drive training, evaluate, record.

``fit`` is the one-call API; ``Trainer`` exposes the same run step by step (start, rounds,
worker weights, evaluation) for notebooks and tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.evaluator import Evaluator
from lsgd_ray._internal.global_leader import GlobalLeader
from lsgd_ray._internal.local_leader import LEADER_CONCURRENCY, LocalLeaderFactory
from lsgd_ray._internal.peer_coordinators import COORDINATORS
from lsgd_ray._internal.protocol import WorkerSpec, actor_class
from lsgd_ray._internal.schedule import ASYNC_POLL_S, Schedule
from lsgd_ray._internal.waiting import get_all, startup_timeout
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms.gossip import base_graph
from lsgd_ray.checkpoint import list_checkpoints, load_latest, map_leaves, save_checkpoint
from lsgd_ray.config import ConfigError, TrainConfig
from lsgd_ray.data import DatasetFactory
from lsgd_ray.divergence import DivergenceWatch, divergence_line
from lsgd_ray.flat import load_flat
from lsgd_ray.models import ModelFactory
from lsgd_ray.optim import OptimizerFactory
from lsgd_ray.results import FitResult, RunLogger, code_version, communication_summary, summary_lines, write_json
from lsgd_ray.topology import PlacementError, Topology, check_available, nodes_from_ray, plan_topology

AVAILABILITY_GRACE_S = 5.0  # how long busy resources may take to free up before placement is refused


class Trainer:
    """One LSGD run on Ray.

    ``model_factory`` and ``dataset_factory`` are picklable zero-argument callables; they run
    inside every worker (and the evaluator). ``optimizer_factory(params)`` overrides the
    optimizer described by ``config.optimizer`` (any ``torch.optim`` optimizer).
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
        self._watch = DivergenceWatch(chance=0.0)  # set from the test set's classes in start()

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _say(self, message: str) -> None:
        if not self.config.quiet:
            print(message, flush=True)

    def _connect(self) -> None:
        cfg = self.config
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if cfg.address:  # "auto": RAY_ADDRESS (as `lsgd-ray cluster run` sets it), else the local cluster
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        else:
            # An embedded single-node Ray sized for the requested workers: logical CPUs may
            # exceed physical cores; each worker then runs torch with one thread.
            wanted = (cfg.num_groups or 1) * (cfg.workers_per_group or 1) * cfg.cpus_per_worker
            num_cpus = max(os.cpu_count() or 1, math.ceil(wanted))
            # address="local": a new instance even if `ray start` left a cluster address behind
            # (plain ray.init() would try to join it, and refuses num_cpus then).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        self._owns_ray = True

    def start(self) -> None:
        """Connect to Ray, check the placement, create and wait for every actor."""
        if self._started:
            return
        cfg, begin = self.config, time.perf_counter()
        self._begin = self._begin or begin
        self._connect()
        self.topology = plan_topology(
            nodes_from_ray(ray.nodes()),
            num_groups=cfg.num_groups,
            workers_per_group=cfg.workers_per_group,
            cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=cfg.gpus_per_worker,
        )
        try:
            from ray._private.state import available_resources_per_node
        except ImportError:  # a private API: without it, the actors' ready() timeout still applies
            available_resources_per_node = None  # type: ignore[assignment]
        if available_resources_per_node is not None:
            # A run that just ended frees its resources a moment after ray.kill: wait briefly.
            deadline = time.perf_counter() + AVAILABILITY_GRACE_S
            while True:
                try:
                    check_available(self.topology, available_resources_per_node())
                    break
                except PlacementError:
                    if time.perf_counter() > deadline:
                        raise
                    time.sleep(0.25)
        topo = self.topology
        if cfg.algorithm in ("dpsgd", "aldsgd"):  # the graph depends on the number of workers
            g = cfg.gossip
            try:
                base_graph(g.graph, topo.num_workers, g.degree, g.graph_seed)
            except ValueError as exc:
                raise ConfigError(f"gossip graph for {topo.num_workers} workers: {exc}") from None
        self._say(
            f"lsgd-ray: {cfg.algorithm}, {len(topo.groups)} group(s) x {topo.group_sizes} worker(s), "
            f"{cfg.mode} mode, {algorithm_summary(cfg)}"
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
            step_delay_s=dict(cfg.straggler_delay_s),
            collective_timeout_s=cfg.actor_timeout_s,
        )
        self._make_local_leader = LocalLeaderFactory(
            spec, self.model_factory, self.dataset_factory, self.optimizer_factory, self.worker_cls, cfg.actor_timeout_s
        )
        self.groups = list(topo.groups)  # the groups still in the run (a dropped one leaves)
        self.local_leaders = [self._make_local_leader(plan) for plan in self.groups]
        self.global_leader = self._make_coordinator()
        self.evaluator = self._make_evaluator()
        names = [f"LocalLeader {g.group}" for g in topo.groups] + ["Evaluator"]
        infos = get_all(
            [ll.ready.remote() for ll in self.local_leaders] + [self.evaluator.ready.remote()],
            startup_timeout(cfg.actor_timeout_s) + 30,
            names,
            hint="actors could not be placed or failed to start",
        )
        self.group_infos = infos[:-1]
        self.workers = [h for g in ray.get([ll.worker_handles.remote() for ll in self.local_leaders]) for h in g]
        get_all(
            [self.global_leader.setup.remote()],
            startup_timeout(cfg.actor_timeout_s) + 30,
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
        self._watch = DivergenceWatch(**ray.get(self.evaluator.baseline.remote()), min_steps=2 * self.steps_per_epoch)
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
        """The GlobalLeader (LSGD) or the peer's coordinator, on the driver's node."""
        cfg, groups = self.config, self.groups
        options = dict(num_cpus=0, max_concurrency=LEADER_CONCURRENCY, scheduling_strategy=_on_driver_node())
        if cfg.algorithm == "lsgd":
            return actor_class(GlobalLeader, **options).remote(
                self.local_leaders, groups, cfg.lsgd, cfg.actor_timeout_s, self._make_local_leader
            )
        # the peers' coordinators play the GlobalLeader's role
        return actor_class(COORDINATORS[cfg.algorithm], **options).remote(
            self.local_leaders, groups, cfg, cfg.actor_timeout_s, self._make_local_leader
        )

    def _make_evaluator(self) -> Any:
        cfg = self.config
        return actor_class(Evaluator, num_cpus=0, scheduling_strategy=_on_driver_node()).remote(
            self.model_factory, self.dataset_factory, cfg.eval_batch_size, cfg.gpus_per_worker > 0, cfg.mode == "sync"
        )

    def _restart_coordinator(self, reason: str) -> None:
        """The coordinator died: start a new one and continue from the last checkpoint (the
        LocalLeaders and workers live on, but their state is rolled back to it so every part
        of the run agrees), or, without a checkpoint, from the workers' current weights."""
        cfg = self.config
        for ll in self.local_leaders:  # let a round still running finish; a lost group is handled below
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ll.settle.remote(), timeout=startup_timeout(cfg.actor_timeout_s))
        known = self._events_known  # the dead coordinator's events, as last seen here
        self.global_leader = self._make_coordinator()
        get_all([self.global_leader.setup.remote()], startup_timeout(cfg.actor_timeout_s) + 30, ["new coordinator"])
        self._events_seen = 0
        earlier = self.status()["events"]  # the new coordinator re-forms or drops groups lost meanwhile
        event = {"event": "coordinator_restarted", "reason": reason, "time": time.time(), "from_checkpoint": None}
        if list_checkpoints(self.output_dir):  # workers it lacks or has beyond this run's: see _restore
            state, where = load_latest(self.output_dir)
            earlier += self._restore(state, where)
            event["from_checkpoint"] = str(where)
        else:  # no checkpoint yet: go on from the current weights
            steps = min(s["steps"] for s in self.worker_stats())
            total = steps * len(self.workers) if cfg.mode == "async" else 0  # async counts steps summed
            ray.get(self.global_leader.set_state.remote({"step": steps, "_total_steps": total, "events": []}))
        event["step"] = self.status()["step"]
        events = [*known, *earlier, event]  # a checkpoint's events are a part of those already seen
        ray.get(self.global_leader.set_state.remote({"events": events}))
        self._events_seen, self._events_known = len(events), events
        self._say(f"lsgd-ray: coordinator {reason}: restarted, continuing from step {event['step']}")

    # ------------------------------------------------------------------ step-by-step API

    def run_rounds(self, seconds: float = math.inf, max_step: int | None = None) -> dict[str, Any]:
        """Synchronous mode: run rounds for ``seconds`` or until workers reach ``max_step``."""
        self.start()
        limit = self.schedule.max_step if max_step is None else max_step
        limit = limit if math.isfinite(limit) else 2**62
        begin = time.perf_counter()
        try:
            status = ray.get(self.global_leader.run_rounds.remote(seconds, limit))
        except ray.exceptions.RayActorError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise  # the coordinator lives; something it waited on failed
            self.train_s += time.perf_counter() - begin
            self._restart_coordinator(f"died ({type(exc).__name__})")
            return self.status()
        self.train_s += time.perf_counter() - begin
        return self._seen(status)

    def worker_weights(self) -> list[np.ndarray]:
        """Every worker's flat weights (parameters then float buffers), by global rank."""
        return ray.get([w.get_weights.remote(False) for w in self.workers])

    def worker_stats(self) -> list[dict[str, Any]]:
        return ray.get([w.stats.remote() for w in self.workers])

    def status(self) -> dict[str, Any]:
        return self._seen(ray.get(self.global_leader.status.remote()))

    def _seen(self, status: dict[str, Any]) -> dict[str, Any]:
        """Take note of the coordinator's ``status``: new events may mean new handles."""
        new = status["events"][self._events_seen :]
        self._events_seen = len(status["events"])
        self._events_known = status["events"]  # a restarted coordinator takes them over
        if new:  # a worker or a group was replaced or dropped (noted first: the refresh may fail)
            self._refresh_handles()
        return status

    def _refresh_handles(self) -> None:
        """The live LocalLeaders and their workers, as the coordinator has them now."""
        self.local_leaders = ray.get(self.global_leader.local_leader_handles.remote())
        self.groups = ray.get(self.global_leader.group_plans.remote()) or self.groups
        self.workers = [h for g in ray.get([ll.worker_handles.remote() for ll in self.local_leaders]) for h in g]

    def leader_weights_ref(self) -> ray.ObjectRef:
        """The evaluated model's weights, by reference: LSGD's leader, the peers' own model."""
        return ray.get(self.global_leader.leader_weights.remote())[0]

    def center_weights_ref(self) -> ray.ObjectRef:
        """LSGD: the mean of all workers' weights, by reference (averaged per group on each
        node, combined by the GlobalLeader; never through this driver)."""
        return ray.get(self.global_leader.center_weights.remote())[0]

    def _evaluated_models(self) -> dict[str, Callable[[], ray.ObjectRef]]:
        """What each evaluation scores: LSGD both its leader and its center, a peer the one
        model it evaluates (its center or workers' mean, under the name "leader")."""
        if self.config.algorithm == "lsgd":
            return {"leader": self.leader_weights_ref, "center": self.center_weights_ref}
        return {"leader": self.leader_weights_ref}

    def _score(self) -> dict[str, dict[str, Any]]:
        """Each evaluated model's test scores: every evaluation started, then one wait."""
        calls = {name: self.evaluator.evaluate.remote(ref()) for name, ref in self._evaluated_models().items()}
        return dict(zip(calls, ray.get(list(calls.values()))))

    def evaluate_leader(self) -> dict[str, Any]:
        """Test loss and accuracy of the evaluated model, recorded in the history. LSGD scores
        both its leader and its center: ``test_*`` are those of ``lsgd.evaluate``'s choice,
        ``leader_test_*`` and ``center_test_*`` both."""
        status = self.status()
        try:
            scores = self._score()
        except ray.exceptions.ActorDiedError:  # e.g. its node was removed: a new one, once
            self.evaluator = self._make_evaluator()
            scores = self._score()
        chosen = self.config.lsgd.evaluate if "center" in scores else "leader"
        result = {**scores[chosen], "eval_s": sum(score["eval_s"] for score in scores.values())}
        if "center" in scores:  # LSGD: both models, by name
            for name, score in scores.items():
                result[f"{name}_test_accuracy"] = score["test_accuracy"]
                result[f"{name}_test_loss"] = score["test_loss"]
        samples = status["total_steps"] * self.config.batch_size
        record = {
            "train_s": self.train_s,
            "samples": samples,
            "step": status["step"],
            "leader": status["leader"],
            "evaluated": status["evaluated"],
            **result,
        }
        self.eval_s += result["eval_s"]
        self.history.append(record)
        divergence = self._watch.check(record)
        if self._logger:
            self._logger.log_eval(record)
            comm = communication_summary(self.worker_stats(), self.weight_bytes, status)
            self._logger.log_workers(status["estimates"], samples, comm)
            if divergence:
                self._logger.log_divergence(divergence, samples)
        self._progress(record)
        if divergence:  # even when quiet: the run goes on, but it should not go unnoticed
            print(divergence.warning(), file=sys.stderr, flush=True)
        return record

    def _progress(self, record: dict[str, Any]) -> None:
        rate = record["samples"] / self.train_s if self.train_s else 0.0
        line = (
            f"[step {record['step']:>6} | {self.train_s:7.1f}s] {record['evaluated']}: "
            f"test_acc={record['test_accuracy']:.4f} test_loss={record['test_loss']:.4f} "
        )
        other = "center" if self.config.lsgd.evaluate == "leader" else "leader"
        if f"{other}_test_accuracy" in record:  # LSGD: the model not chosen, in brief
            line += f"({other} {record[f'{other}_test_accuracy']:.4f}) "
        line += f"samples={record['samples']:,} ({rate:,.0f}/s)"
        budget = self._budget_fraction(record["step"])
        if 0 < budget < 1:
            line += f" eta {self.train_s * (1 - budget) / budget:.0f}s"
        self._say(line)

    def _budget_fraction(self, step: int) -> float:
        fractions = []
        if math.isfinite(self.schedule.max_step):
            fractions.append(step / self.schedule.max_step)
        if self.config.time_budget_s:
            fractions.append(self.train_s / self.config.time_budget_s)
        return max(fractions, default=0.0)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> str:
        """Commit a checkpoint of the whole run now (between rounds in synchronous mode; in
        asynchronous mode each worker's state is taken between two of its own steps)."""
        coordinator = ray.get(self.global_leader.get_state.remote())
        workers = get_all(
            [w.get_state.remote() for w in self.workers],
            self.config.actor_timeout_s,
            [f"worker {r}" for r in range(len(self.workers))],
        )
        step = min(w["steps"] for w in workers)
        state = {
            "algorithm": self.config.algorithm,
            "coordinator": _tensors(coordinator),
            "workers": workers,
            "trainer": {
                "history": self.history,
                "train_s": self.train_s,
                "eval_s": self.eval_s,
                "divergence": self._watch.found.to_dict() if self._watch.found else None,
            },
        }
        meta = {
            "algorithm": self.config.algorithm,
            "mode": self.config.mode,
            "num_workers": len(workers),
            "steps_per_worker": step,
            "train_s": self.train_s,
            "code_version": code_version(os.path.dirname(os.path.abspath(__file__))),
            "config": self.config.to_dict(),
        }
        path = save_checkpoint(self.output_dir, step, state, meta, self.config.keep_checkpoints)
        self.schedule.checkpointed(step, self.train_s)
        self.checkpoints.append(str(path))
        self._say(f"lsgd-ray: checkpoint at step {step} -> {path}")
        return str(path)

    def _resume(self, path: str) -> None:
        """Load the newest usable checkpoint under ``path`` into the freshly started actors."""
        state, where = load_latest(path)
        saved = json.loads((where / "meta.json").read_text())
        saved_ranks = [w["rank"] for w in state["workers"]]
        _check_resumable(saved.get("config", {}), self.config.to_dict(), saved_ranks, self._ranks())
        ray.get(self.global_leader.add_events.remote(self._restore(state, where)))
        self.resumed_from = str(where)
        self._say(f"lsgd-ray: resumed from {where} (step {self.schedule.checkpoint_step}, {self.train_s:.1f}s trained)")

    def _ranks(self) -> list[int]:
        """The global rank of each of ``self.workers``."""
        return [rank for g in self.groups for rank in g.ranks]

    def _restore(self, state: dict[str, Any], where: Any) -> list[dict[str, Any]]:
        """Put a checkpoint's state into the running actors and this driver, worker by rank.
        A worker the checkpoint lacks (its group had been dropped when it was written) starts
        from the checkpoint's leader's weights at its step, with a fresh optimizer state; one
        it has beyond the run's workers (a group dropped since) is left out. Returns the
        events to record (the caller adds them to the coordinator's)."""
        saved = {w["rank"]: w for w in state["workers"]}
        ranks, timeout = self._ranks(), self.config.actor_timeout_s
        get_all(
            [w.set_state.remote(saved[r]) for w, r in zip(self.workers, ranks) if r in saved],
            timeout,
            [f"worker {r}" for r in ranks if r in saved],
        )
        missing = [(w, r) for w, r in zip(self.workers, ranks) if r not in saved]
        coordinator = _arrays(state["coordinator"])
        ray.get(self.global_leader.set_state.remote(coordinator))
        events = []
        if missing:
            leader = coordinator.get("leader", -1)
            source = saved[leader] if leader in saved else next(iter(saved.values()))
            steps = min(w["steps"] for w in state["workers"])
            weights = source["weights"].numpy()
            get_all(
                [w.reset_to.remote(weights, steps) for w, _ in missing], timeout, [f"worker {r}" for _, r in missing]
            )
            origin = f"worker {source['rank']}'s weights in the checkpoint"
            event = {
                "event": "workers_restarted",
                "ranks": [r for _, r in missing],
                "reason": "not in the checkpoint (their group had been dropped)",
                "step": steps,
                "from": origin,
                "time": time.time(),
            }
            events.append(event)
            self._say(f"lsgd-ray: workers {event['ranks']} {event['reason']}: started from {origin}")
        trainer = state["trainer"]
        self.history = list(trainer["history"])
        self._watch.resume(self.history, trainer.get("divergence"))
        self.train_s, self.eval_s = float(trainer["train_s"]), float(trainer["eval_s"])
        self.schedule.checkpointed(min(w["steps"] for w in state["workers"]), self.train_s)
        self.schedule.evaluated(self.train_s)
        return events

    # ------------------------------------------------------------------ whole runs

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
                self.evaluate_leader()
        except BaseException as exc:  # keep what we have, then re-raise
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._write_result(error)
            raise
        return self._write_result(error)

    def _evaluation_ends_run(self) -> bool:
        """Whether the last evaluation ends the run: it reached ``target_accuracy``, or it showed
        a divergence and ``stop_on_divergence`` is set."""
        if self.config.stop_on_divergence and self._watch.found is not None:
            return True
        target = self.config.target_accuracy
        return target is not None and bool(self.history) and self.history[-1]["test_accuracy"] >= target

    def _fit_sync(self) -> None:
        """Rounds in chunks that end at the next evaluation, checkpoint or end of the budget. The
        coordinator may die in any call between rounds too (a checkpoint, an evaluation): it is
        restarted as in ``run_rounds`` and the turn taken again."""
        self.schedule.evaluated(self.train_s)
        while True:
            try:
                if self._sync_turn():
                    return
            except ray.exceptions.RayActorError as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) or self._coordinator_alive():
                    raise
                self._restart_coordinator(f"died ({type(exc).__name__})")

    def _sync_turn(self) -> bool:
        """Rounds up to the next deadline, then what is due; whether the run is over."""
        schedule = self.schedule
        limit = schedule.step_limit()
        status = self.run_rounds(schedule.wait_s(self.train_s), int(limit) if math.isfinite(limit) else None)
        done = schedule.finished(status["step"], self.train_s)
        if schedule.checkpointing and (done or schedule.checkpoint_due(status["step"], self.train_s)):
            self.checkpoint()
        if done:
            return True
        if schedule.evaluation_due(self.train_s):
            self.evaluate_leader()
            schedule.evaluated(self.train_s)
            if self._evaluation_ends_run():
                if schedule.checkpointing:
                    self.checkpoint()
                return True
        return False

    def _fit_async(self) -> None:
        """Every worker's own loop; the driver wakes for evaluations, checkpoints, failures and
        the end of the budget."""
        cfg, schedule = self.config, self.schedule
        report_every = async_report_period(cfg)
        max_steps = None if not math.isfinite(schedule.max_step) else int(schedule.max_step)
        begin, trained = time.perf_counter(), self.train_s  # resumed runs continue the clock
        loops: dict[int, ray.ObjectRef] = {}
        self._take_loops(loops, ray.get(self.global_leader.start_async.remote(report_every, max_steps)))
        schedule.evaluated(trained)
        while True:
            try:
                wait = schedule.wait_s(self.train_s)
                if schedule.checkpoint_every_steps:
                    wait = min(wait, ASYNC_POLL_S)  # look at the step count this often
                ready, pending = ray.wait(list(loops.values()), num_returns=len(loops), timeout=wait)
                self.train_s = trained + time.perf_counter() - begin
                if self._restart_dead_loops(loops, ready):
                    continue
                if not pending:
                    break
                if schedule.time_left(self.train_s) <= 0 or self._evaluation_ends_run():
                    for worker in self.workers:
                        worker.stop.remote()
                    get_all(list(loops.values()), cfg.actor_timeout_s, [f"worker {r}" for r in loops])
                    self.train_s = trained + time.perf_counter() - begin
                    break
                if schedule.checkpointing and schedule.checkpoint_due(self.status()["step"], self.train_s):
                    self.checkpoint()  # each worker's state between two of its steps
                if schedule.evaluation_due(self.train_s):
                    self.evaluate_leader()  # the workers keep training meanwhile
                    # reached the target: stop at the next turn, without waiting
                    schedule.evaluated(self.train_s, now_again=self._evaluation_ends_run())
            except ray.exceptions.RayActorError as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) or self._coordinator_alive():
                    raise
                self.train_s = trained + time.perf_counter() - begin
                for worker in self.workers:  # every loop stops; the new coordinator starts them again
                    worker.stop.remote()
                ray.wait(list(loops.values()), num_returns=len(loops), timeout=startup_timeout(cfg.actor_timeout_s))
                self._restart_coordinator(f"died ({type(exc).__name__})")
                begin, trained = time.perf_counter(), self.train_s  # the checkpoint's clock
                loops = {}
                self._take_loops(loops, ray.get(self.global_leader.start_async.remote(report_every, max_steps)))
                schedule.evaluated(trained)
        ray.get(list(loops.values()))  # a loop that failed raises here
        if schedule.checkpointing:
            self.checkpoint()

    def _coordinator_alive(self) -> bool:
        try:
            ray.get(self.global_leader.local_leader_handles.remote(), timeout=self.config.actor_timeout_s)
            return True
        except ray.exceptions.RayActorError:
            return False

    def _restart_dead_loops(self, loops: dict[int, ray.ObjectRef], ready: list[ray.ObjectRef]) -> bool:
        """Asynchronous mode: loops (by rank) that ended because their process died are started
        again by the coordinator: a dead worker is replaced on its node, a group whose
        LocalLeader died is re-formed or, its node gone, dropped (its ranks leave ``loops``)."""
        rank_of = {ref: rank for rank, ref in loops.items()}
        failed = {}
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                if isinstance(exc, ray.exceptions.RayTaskError):
                    raise  # the worker's own error
                failed[rank_of[ref]] = f"died ({type(exc).__name__})"
        if not failed:
            return False
        self._take_loops(loops, ray.get(self.global_leader.restart_loops.remote(failed)))
        return True

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

    def _write_result(self, error: str | None) -> FitResult:
        status, stats, final = {}, [], self.history[-1] if self.history else {}
        try:
            status, stats = self.status(), self.worker_stats()
            if error is None:
                self._save_leader_weights()
        except Exception as exc:  # the cluster may be gone: write what we know
            error = error or f"could not collect the final state: {exc}"
        timings = {
            "startup_s": self.startup_s,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "total_s": time.perf_counter() - self._begin if self._begin else 0.0,
            "round_wall_s": status.get("round_wall_s", 0.0),
            "round_compute_s": status.get("round_compute_s", 0.0),
            "worker_compute_s": [s["compute_s"] for s in stats],
        }
        result = FitResult(
            output_dir=os.path.abspath(self.output_dir),
            status="failed" if error else "diverged" if self._watch.found else "completed",
            algorithm=self.config.algorithm,
            evaluated=final.get("evaluated", status.get("evaluated", "")),
            final_test_accuracy=final.get("test_accuracy"),
            final_test_loss=final.get("test_loss"),
            final_leader_test_accuracy=final.get("leader_test_accuracy"),  # LSGD only, like the center's
            final_leader_test_loss=final.get("leader_test_loss"),
            final_center_test_accuracy=final.get("center_test_accuracy"),
            final_center_test_loss=final.get("center_test_loss"),
            leader=final.get("leader", status.get("leader", -1)),
            steps_per_worker=max((s["steps"] for s in stats), default=0),
            samples=sum(s["steps"] for s in stats) * self.config.batch_size,
            history=self.history,
            timings=timings,
            communication=communication_summary(stats, getattr(self, "weight_bytes", 0), status),
            leader_counts=status.get("leader_counts", []),
            leader_changes=status.get("leader_changes", []),
            events=status.get("events", []),
            checkpoints=self.checkpoints,
            resumed_from=self.resumed_from,
            topology=[
                {k: g[k] for k in ("group", "node_id", "node_ip", "pid", "workers")}
                for g in getattr(self, "group_infos", [])
            ],
            config=self.config.to_dict(),
            error=error,
            divergence=self._watch.found.to_dict() if self._watch.found else None,
        )
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, "result.json"), result.to_dict())
        if error is None:
            print(summary_lines(result), flush=True)  # even when quiet: it says where the results are
            if self._watch.found:
                opt = self.config.optimizer
                print(f"lsgd-ray: {divergence_line(result, self._watch.found, opt.lr, opt.name)}", flush=True)
        return result

    def _save_leader_weights(self) -> None:
        weights = ray.get(self.leader_weights_ref())
        model = load_flat(self.model_factory(), weights)
        path = os.path.join(self.output_dir, "leader_state_dict.pt")
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def shutdown(self) -> None:
        """Stop every actor this run started (and the embedded Ray, if this run started it)."""
        if self._logger:
            self._logger.close()
            self._logger = None
        actors = [*getattr(self, "workers", []), *getattr(self, "local_leaders", [])]
        actors += [getattr(self, "global_leader", None), getattr(self, "evaluator", None)]
        for handle in actors:
            if handle is not None:
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(handle)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._started = False


# Settings that may differ between a run and its resumption (budgets, logging, where things go).
RESUMABLE_CHANGES = {
    "epochs",
    "max_steps",
    "time_budget_s",
    "eval_every_s",
    "target_accuracy",
    "eval_batch_size",
    "output_dir",
    "address",
    "quiet",
    "resume",
    "stop_on_divergence",
    "checkpoint_every_steps",
    "checkpoint_every_s",
    "keep_checkpoints",
    "actor_timeout_s",
}


def resumed_run_dir(resume: str | None) -> str | None:
    """The run directory a ``resume`` path belongs to (a run dir, or one of its checkpoints)."""
    if not resume:
        return None
    path = os.path.abspath(resume)
    if os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path))
    return path[: -len("/checkpoints")] if path.endswith("/checkpoints") else path


def _on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The coordinator and the evaluator run on the driver's node, so they die only with the
    driver, never with a node of workers. A hard affinity: with ``soft=True`` Ray places these
    zero-CPU actors on other nodes when the driver's has no CPUs (a head node with
    ``num_cpus=0``), and a coordinator that died with a group's node could not be restarted."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], saved_ranks: list[int], ranks: list[int]) -> None:
    """Refuse a checkpoint of another layout (each worker's rank fixes its data shard; ranks
    missing from it are those of a group that had been dropped, started again from its leader)."""
    if not set(saved_ranks) <= set(ranks):
        raise ConfigError(
            f"the checkpoint has workers of ranks {sorted(saved_ranks)}, this run has {len(ranks)} workers: "
            "resume on the same layout"
        )
    differ = [
        f"{key}: {saved[key]!r} then, {now.get(key)!r} now"
        for key in sorted(saved)
        if key not in RESUMABLE_CHANGES and saved[key] != now.get(key)
    ]
    if differ:
        raise ConfigError(
            "resume with the settings the run was started with (only budgets, evaluation, checkpointing "
            "and output may change); these differ: " + "; ".join(differ)
        )


def _tensors(value: Any) -> Any:
    """NumPy arrays as tensors, so a checkpoint loads with ``torch.load(weights_only=True)``."""
    return map_leaves(value, np.ndarray, lambda a: torch.from_numpy(np.array(a, copy=True)))


def _arrays(value: Any) -> Any:
    """The reverse of ``_tensors`` for the coordinators, which never import torch."""
    return map_leaves(value, torch.Tensor, lambda t: t.numpy())


def algorithm_summary(cfg: TrainConfig) -> str:
    """The algorithm's settings, for the start-up line."""
    if cfg.algorithm == "lsgd":
        c = cfg.lsgd
        return f"tau={c.tau} tau_G={c.tau_global} lam={c.lam} lam_G={c.lam_global}"
    if cfg.algorithm == "easgd":
        return f"tau={cfg.easgd.tau} beta={cfg.easgd.beta} alpha={cfg.easgd.alpha or 'beta/p'}"
    if cfg.algorithm == "downpour":
        return f"n_push={cfg.downpour.n_push} n_fetch={cfg.downpour.n_fetch} rule={cfg.downpour.rule}"
    if cfg.algorithm == "local_sgd":
        return f"tau={cfg.local_sgd.tau} tau_G={cfg.local_sgd.tau_global}"
    if cfg.algorithm in ("dpsgd", "aldsgd"):
        g = cfg.gossip
        extra = f" c1={g.c1} c2={g.c2} p1={g.p1} p2={g.p2}" if cfg.algorithm == "aldsgd" else ""
        return f"graph={g.graph} rotation={g.rotation} tau={g.tau}{extra}"
    return "gradients all-reduced every step"


def async_report_period(cfg: TrainConfig) -> int:
    """How often (in its own steps) an asynchronous worker reports its progress."""
    if cfg.algorithm == "easgd":
        return cfg.easgd.tau
    if cfg.algorithm == "downpour":
        return min(cfg.downpour.n_push, cfg.downpour.n_fetch)
    return max(1, min(cfg.lsgd.tau, cfg.lsgd.tau_global))


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
