"""Plain single-process PyTorch references for the exactness tests."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from lsgd_ray.config import TrainConfig
from lsgd_ray.data import BatchStream, shard_indices, worker_seed
from lsgd_ray.flat import flatten_state
from lsgd_ray.optim import torch_optimizer  # torch's own: the workers' SGD is held to it


def plain_loop(rank: int, num_workers: int, steps: int, cfg: TrainConfig, model_fn, data_fn):
    """What worker ``rank`` computes on its own: same seed, shard, batch order and optimizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop = StepLoop(rank, num_workers, cfg, model_fn, data_fn)
        for _ in range(steps):
            loop.step()
        return loop.flat(), loop.losses
    finally:
        torch.set_num_threads(threads)


def big_batch_loop(num_workers: int, steps: int, cfg: TrainConfig, model_fn, data_fn):
    """One process taking, at every step, the union of what the ``num_workers`` workers draw."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        model = model_fn()
        optimizer = torch_optimizer(model.parameters(), cfg.optimizer)
        data = data_fn()
        shards = [shard_indices(len(data.y_train), num_workers, r, cfg.seed) for r in range(num_workers)]
        streams = [BatchStream(len(s), cfg.batch_size, worker_seed(cfg.seed, r)) for r, s in enumerate(shards)]
        for _ in range(steps):
            index = torch.cat([shard[stream.next()] for shard, stream in zip(shards, streams)])
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return flatten_state(model)
    finally:
        torch.set_num_threads(threads)


def sampler_batches(n: int, num_workers: int, rank: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Rank ``rank``'s batches as torch's own ``DistributedSampler`` deals them, ``set_epoch``
    at every epoch, one endless stream cut into batches of ``batch_size`` (across epochs)."""

    def indices() -> Iterator[int]:
        sampler = DistributedSampler(range(n), num_replicas=num_workers, rank=rank, shuffle=True, seed=seed)
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from sampler

    stream = indices()
    while True:
        yield torch.tensor(list(itertools.islice(stream, batch_size)))


class StepLoop:
    """Worker ``rank``'s plain loop, one step at a time (for references that interleave pulls).
    ``cfg.redeal_shards``: the batches come from torch's DistributedSampler over the whole split."""

    def __init__(self, rank: int, num_workers: int, cfg: TrainConfig, model_fn, data_fn) -> None:
        torch.manual_seed(cfg.seed)
        self.model = model_fn()
        self.optimizer = torch_optimizer(self.model.parameters(), cfg.optimizer)
        data = data_fn()
        n = len(data.y_train)
        if cfg.redeal_shards:
            self.x, self.y = data.x_train, data.y_train
            self.batches = sampler_batches(n, num_workers, rank, cfg.seed, cfg.batch_size)
        else:
            shard = shard_indices(n, num_workers, rank, cfg.seed)
            self.x, self.y = data.x_train[shard], data.y_train[shard]
            stream = BatchStream(len(shard), cfg.batch_size, worker_seed(cfg.seed, rank))
            self.batches = iter(stream.next, None)
        self.losses: list[float] = []

    def step(self) -> None:
        index = next(self.batches)
        loss = F.cross_entropy(self.model(self.x[index]), self.y[index])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())

    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def flat(self) -> torch.Tensor:
        return flatten_state(self.model)

    def lerp_(self, target: torch.Tensor, strength: float) -> None:
        """``x ← x − strength·(x − target)`` on the model's flat parameters."""
        with torch.no_grad():
            offset = 0
            for p in self.params():
                n = p.numel()
                p.lerp_(target[offset : offset + n].view_as(p), strength)
                offset += n


def once_checkpointed(run_dir, action, poll_s: float = 0.02, give_up_s: float = 120.0):
    """Call ``action()`` from a thread as soon as the run in ``run_dir`` has committed its first
    checkpoint (a fixed timer raced the run's start-up on a loaded machine and struck first)."""
    import threading
    import time

    from lsgd_ray.checkpoint import list_checkpoints

    def wait_then_act():
        deadline = time.monotonic() + give_up_s
        while not list_checkpoints(run_dir):
            if time.monotonic() > deadline:
                return
            time.sleep(poll_s)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def kill_if_alive(pid: int) -> None:
    """SIGKILL process ``pid`` unless it is gone already."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def stopped(pid: int, after_s: float = 0.0) -> Iterator[None]:
    """Process ``pid`` stopped (SIGSTOP, as a hung worker) ``after_s`` from now, from a timer;
    on leaving, SIGKILLed if it is still there: a stopped process never exits by itself, and it
    would hold its CPU into the next test."""
    import os
    import signal
    import threading

    timer = threading.Timer(after_s, os.kill, (pid, signal.SIGSTOP)) if after_s else None
    if timer is None:
        os.kill(pid, signal.SIGSTOP)
    else:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        kill_if_alive(pid)


def loaded(actor, module: str) -> bool:
    """Whether ``module`` is imported in ``actor``'s process (asked through ``__ray_call__``)."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _: module in __import__("sys").modules))


def torch_loaded(actor) -> bool:
    """Whether torch has been executed in ``actor``'s process (asked of ``torch._C``: a lazy
    name for torch in the Worker's modules is not an import)."""
    return loaded(actor, "torch._C")
