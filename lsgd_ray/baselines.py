"""The contenders a user would pick instead of lsgd-ray, for side-by-side benchmarks.

- :func:`plain_loop`: one single-process PyTorch training loop on the whole training set.
- :func:`ray_train_ddp`: Ray Train v2's ``TorchTrainer``, every rank a DistributedDataParallel
  replica on its own shard (gloo on CPU).

Both use the library's own pieces (``batch_stream``, ``worker_seed``; ``redeal_shards`` as
``TrainConfig``'s) and torch's own optimizer (``torch_optimizer``: what a plain PyTorch loop
runs), evaluate on the test split and stop as their :class:`Budget` says (evaluation is off the
training clock), and return a :class:`BaselineResult` whose ``history`` has the same records as
``FitResult.history`` (``train_s``, ``samples``, ``step``, ``test_accuracy``, ``test_loss``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lsgd_ray._internal.evaluator import score
from lsgd_ray.comm_hooks import COMM_HOOKS, register_comm_hook
from lsgd_ray.config import OptimizerConfig
from lsgd_ray.data import DatasetFactory, ImageFiles, batch_stream, resident, worker_seed
from lsgd_ray.flat import flatten_state
from lsgd_ray.models import ModelFactory
from lsgd_ray.optim import torch_optimizer


@dataclass
class BaselineResult:
    history: list[dict[str, Any]]
    steps: int  # per worker
    samples: int  # all workers together
    train_s: float  # training clock (evaluation excluded)
    eval_s: float
    wall_s: float  # the whole call, set-up and start-up included
    startup_s: float | None = None  # ray_train_ddp: fit() called until the first training step
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. ray_train_ddp's per-rank weight digests

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s if self.train_s > 0 else 0.0

    @property
    def final_test_accuracy(self) -> float | None:
        return self.history[-1]["test_accuracy"] if self.history else None

    def time_to(self, target: float) -> float | None:
        """Training seconds at the first evaluation with accuracy >= ``target`` (None: never)."""
        return next((r["train_s"] for r in self.history if r["test_accuracy"] >= target), None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


@dataclass(frozen=True)
class Budget:
    """When a baseline evaluates and stops: ``time_budget_s`` seconds of training (evaluation is
    off the clock) and/or ``max_steps`` steps, an evaluation every ``eval_every_s`` training
    seconds and at the stop, and an early stop at the first evaluation reaching
    ``target_accuracy``. ``warmup_steps`` run first, off the clock and uncounted."""

    time_budget_s: float | None = None
    max_steps: int | None = None
    eval_every_s: float = 5.0
    target_accuracy: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds (or None with max_steps), got {self.time_budget_s!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.time_budget_s is None and self.max_steps is None:
            raise ValueError("give a budget: time_budget_s (training seconds) and/or max_steps")
        if not self.eval_every_s > 0:
            raise ValueError(f"eval_every_s must be > 0 seconds, got {self.eval_every_s!r}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")

    def reached(self, record: dict[str, Any]) -> bool:
        """Whether the evaluation ``record`` reached the target (never, without one)."""
        return self.target_accuracy is not None and record["test_accuracy"] >= self.target_accuracy


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class _Shard:
    """One replica's model, optimizer, shard and batch order, stepped like a lsgd-ray Worker."""

    def __init__(
        self, model_factory: ModelFactory, dataset_factory: DatasetFactory, opt: OptimizerConfig, batch_size: int,
        seed: int, rank: int, num_workers: int, redeal_shards: bool = False,
    ) -> None:  # fmt: skip
        torch.manual_seed(seed)  # same initial weights on every rank
        self.model = model_factory()
        self.optimizer = torch_optimizer(self.model.parameters(), opt)
        data = dataset_factory()
        n = len(data.y_train)
        shard, self.stream = batch_stream(n, batch_size, seed, num_workers, rank, redeal_shards)
        self.x = resident(data.x_train, torch.device("cpu"), shard)
        self.y = data.y_train if shard is None else data.y_train[shard]
        self.augment = data.augment
        self.augment_rng = torch.Generator().manual_seed(worker_seed(seed, rank) + 1)
        x_test = data.x_test
        if isinstance(x_test, ImageFiles):
            x_test = x_test.load(torch.arange(len(x_test)))
        self.x_test = data.augment.test(x_test) if data.augment else x_test
        self.y_test = data.y_test
        torch.manual_seed(worker_seed(seed, rank))  # dropout differs between ranks, as across workers

    def step(self, model: torch.nn.Module) -> None:
        index = self.stream.next()
        if isinstance(self.x, ImageFiles):
            x = self.x.load(index, self.augment_rng)
        else:
            x = self.x[index]
            if self.augment is not None:
                x = self.augment(x, self.augment_rng)
        loss = F.cross_entropy(model(x), self.y[index])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def evaluate(self, batch_size: int = 1024) -> dict[str, float]:
        scores = score(self.model, self.x_test, self.y_test, batch_size, torch.device("cpu"))
        self.model.train()
        return scores


class _Clock:
    """The training clock and the evaluate/stop schedule both contenders share."""

    def __init__(self, budget: Budget) -> None:
        self.time_limit_s = math.inf if budget.time_budget_s is None else budget.time_budget_s
        self.max_steps = budget.max_steps or 2**62
        self.eval_every_s = budget.eval_every_s
        self.train_s = self.eval_s = 0.0
        self.next_eval = budget.eval_every_s
        self._since = time.perf_counter()

    def pause(self) -> None:
        self.train_s += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def now(self) -> float:
        return self.train_s + time.perf_counter() - self._since

    def decide(self, step: int) -> tuple[bool, bool]:
        """(evaluate now, stop after that evaluation); the final evaluation comes with the stop."""
        t = self.now()
        stop = t >= self.time_limit_s or step >= self.max_steps
        return stop or t >= self.next_eval, stop


def _record(clock: _Clock, shard: _Shard, step: int, samples: int) -> dict[str, Any]:
    begin = time.perf_counter()
    scores = shard.evaluate()
    eval_s = time.perf_counter() - begin
    clock.eval_s += eval_s
    clock.next_eval = clock.train_s + clock.eval_every_s
    return {"train_s": clock.train_s, "samples": samples, "step": step, **scores, "eval_s": eval_s}


def plain_loop(
    model_factory: ModelFactory,
    dataset_factory: DatasetFactory,
    *,
    batch_size: int,
    optimizer: OptimizerConfig,
    budget: Budget,
    seed: int = 0,
    threads: int | None = None,
    return_weights: bool = False,
    redeal_shards: bool = False,
) -> BaselineResult:
    """One PyTorch process training on the whole training set (shard 0 of 1, lsgd-ray's batch
    order for rank 0, or its re-dealt order with ``redeal_shards``), with ``threads`` torch
    threads (default: torch's), for ``budget``. With ``return_weights``, ``extra["weights"]`` holds the
    final flat weights (``lsgd_ray.flat.flatten_state``)."""
    _check_batch_size(batch_size)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    wall = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    try:
        shard = _Shard(model_factory, dataset_factory, optimizer, batch_size, seed, 0, 1, redeal_shards)
        shard.model.train()
        for _ in range(budget.warmup_steps):
            shard.step(shard.model)
        clock, history, step = _Clock(budget), [], 0
        while True:
            evaluate, stop = clock.decide(step)
            if evaluate:
                clock.pause()
                history.append(_record(clock, shard, step, step * batch_size))
                stop = stop or budget.reached(history[-1])
                clock.resume()
            if stop:
                break
            shard.step(shard.model)
            step += 1
    finally:
        torch.set_num_threads(saved_threads)
    extra = {"weights": flatten_state(shard.model)} if return_weights else {}
    wall_s = time.perf_counter() - wall
    return BaselineResult(history, step, step * batch_size, clock.train_s, clock.eval_s, wall_s, extra=extra)


# --------------------------------------------------------------------------- Ray Train DDP


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def ddp_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The per-rank training function of :func:`ray_train_ddp` (runs inside a Ray Train worker).

    Every ``decide_every`` steps rank 0 broadcasts (evaluate now, stop now); on "evaluate" it
    scores its replica while the others wait in the next collective, then broadcasts whether the
    target was reached. So all ranks take the same number of steps and stop together."""
    import ray.train
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    shard = _Shard(
        config["model_factory"], config["dataset_factory"], config["optimizer"], config["batch_size"],
        config["seed"], rank, world, config.get("redeal_shards", False),
    )  # fmt: skip
    ddp = DistributedDataParallel(shard.model)  # broadcasts rank 0's weights; gloo on CPU
    register_comm_hook(ddp, config.get("comm_hook"), config.get("powersgd_rank", 2), config.get("powersgd_start", 10))
    ddp.train()
    budget: Budget = config["budget"]
    for _ in range(budget.warmup_steps):
        shard.step(ddp)
    dist.barrier()
    first_step_time = time.time()
    clock = _Clock(budget)
    history: list[dict[str, Any]] = []
    flags, step, batch, every = torch.zeros(2), 0, config["batch_size"], config["decide_every"]
    while True:
        if step % every == 0 or step >= clock.max_steps:
            if rank == 0:
                flags[:] = torch.tensor(clock.decide(step), dtype=torch.float32)
            dist.broadcast(flags, 0)
            evaluate, stop = bool(flags[0]), bool(flags[1])
            if evaluate:
                clock.pause()
                if rank == 0:
                    history.append(_record(clock, shard, step, step * batch * world))  # the module, no collectives
                    flags[1] = float(stop or budget.reached(history[-1]))
                dist.broadcast(flags, 0)
                stop = bool(flags[1])
                clock.resume()
            if stop:
                break
        shard.step(ddp)
        step += 1
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, _digest(shard.model))
    out = {
        "history": history,
        "steps": step,
        "samples": step * batch * world,
        "train_s": clock.train_s,
        "eval_s": clock.eval_s,
        "first_step_time": first_step_time,
        "digests": digests,
    }
    if rank == 0 and config["return_weights"]:
        out["weights"] = flatten_state(shard.model).tolist()
    if rank == 0 and config.get("result_file"):  # a second way back, should the return value not come
        with open(config["result_file"], "w") as f:
            json.dump(out, f)
    return out


def ray_train_ddp(
    model_factory: ModelFactory,
    dataset_factory: DatasetFactory,
    *,
    num_workers: int,
    batch_size: int,
    optimizer: OptimizerConfig,
    budget: Budget,
    seed: int = 0,
    cpus_per_worker: int = 1,
    use_gpu: bool = False,
    decide_every: int = 4,
    return_weights: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    comm_hook: str | None = None,
    powersgd_rank: int = 2,
    powersgd_start: int = 10,
    redeal_shards: bool = False,
) -> BaselineResult:
    """Ray Train v2 ``TorchTrainer``: ``num_workers`` DDP ranks of ``cpus_per_worker`` CPUs (and
    torch threads), each on shard ``rank`` of the training set with ``batch_size`` per rank;
    rank 0 evaluates. Uses the running Ray (or starts one, as ``TorchTrainer`` does).

    ``decide_every``: steps between rank 0's (evaluate, stop) broadcasts. ``extra`` of the result
    holds every rank's digest of its final parameters (equal if the ranks stayed in step) and,
    with ``return_weights``, rank 0's flat final weights. ``startup_s``: ``fit()`` called until
    the first timed step (after the budget's ``warmup_steps``). ``comm_hook``: gradient
    compression with one of torch's DDP communication hooks (:func:`register_comm_hook`)."""
    _check_batch_size(batch_size)
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    if not isinstance(cpus_per_worker, int) or cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be a positive integer, got {cpus_per_worker!r}")
    if not isinstance(decide_every, int) or decide_every < 1:
        raise ValueError(f"decide_every must be a positive integer, got {decide_every!r}")
    if use_gpu:
        raise ValueError("ray_train_ddp runs on CPUs only here (use_gpu=False)")
    if comm_hook not in (None, *COMM_HOOKS):
        raise ValueError(f"comm_hook must be one of {COMM_HOOKS} or None, got {comm_hook!r}")
    if comm_hook == "powersgd" and not (isinstance(powersgd_rank, int) and powersgd_rank >= 1 and powersgd_start >= 2):
        raise ValueError(f"powersgd_rank must be >= 1 and powersgd_start >= 2, got {powersgd_rank}, {powersgd_start}")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = os.path.abspath(storage_path or tempfile.mkdtemp(prefix="ray_train_ddp_"))
    name = name or f"ddp-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.makedirs(os.path.join(storage_path, name), exist_ok=True)
    result_file = os.path.join(storage_path, name, "ddp_result.json")
    config = {
        "model_factory": model_factory,
        "dataset_factory": dataset_factory,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "seed": seed,
        "redeal_shards": redeal_shards,
        "budget": budget,
        "threads": cpus_per_worker,
        "decide_every": decide_every,
        "result_file": result_file,
        "return_weights": return_weights,
        "comm_hook": comm_hook,
        "powersgd_rank": powersgd_rank,
        "powersgd_start": powersgd_start,
    }
    train_loop: Any = ddp_train_loop  # Ray Train v2 takes the loop's return value; the v1 hints do not
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(storage_path=storage_path, name=name),
    )
    begin_wall, begin = time.time(), time.perf_counter()
    result = trainer.fit()  # raises TrainingFailedError if a rank failed
    wall_s = time.perf_counter() - begin
    out = getattr(
        result, "return_value", None
    )  # rank 0's return value (Ray Train v2) (Result.metrics only holds checkpointed reports)
    if out is None:
        with open(result_file) as f:
            out = json.load(f)
    return BaselineResult(
        out["history"],
        out["steps"],
        out["samples"],
        out["train_s"],
        out["eval_s"],
        wall_s,
        startup_s=out["first_step_time"] - begin_wall,
        extra={k: v for k, v in out.items() if k in ("digests", "weights")}
        | {"path": os.path.join(storage_path, name)},
    )
