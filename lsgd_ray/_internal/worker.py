"""Worker: one model replica with its optimizer, data shard and flat weight buffer.

A plain class, made remote where it is spawned (by its LocalLeader), so tests can swap it.
It runs with ``max_concurrency > 1``: in asynchronous mode (``worker_async.py``) its training
loop occupies one thread while pulls, weight requests and ``stop`` arrive on others; the peers'
exchanges are in ``worker_peers.py``.

torch, and the package's modules that import it, are named through ``lazy_module``: a LocalLeader
or coordinator, which imports this module only to hold Worker handles, never loads them
(``lazy.py``); the Worker itself loads them first thing in ``__init__``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from lsgd_ray._internal.lazy import lazy_module, load
from lsgd_ray._internal.protocol import WorkerSpec, node_id, node_ip
from lsgd_ray._internal.worker_async import AsyncWorkerMixin
from lsgd_ray._internal.worker_diloco import DiLoCoWorkerMixin
from lsgd_ray._internal.worker_peers import PeerWorkerMixin
from lsgd_ray._internal.worker_state import WorkerStateMixin
from lsgd_ray.algorithms.lsgd import LossWindow, ProximalTargets, pull_toward
from lsgd_ray.wire import encode

if TYPE_CHECKING:
    import torch

    from lsgd_ray import comm_hooks, flat, optim
    from lsgd_ray import data as datasets
    from lsgd_ray.data import DatasetFactory
    from lsgd_ray.models import ModelFactory
    from lsgd_ray.optim import OptimizerFactory
else:
    torch = lazy_module("torch")
    comm_hooks, datasets, flat, optim = (lazy_module(f"lsgd_ray.{m}") for m in ("comm_hooks", "data", "flat", "optim"))


class Worker(WorkerStateMixin, AsyncWorkerMixin, PeerWorkerMixin, DiLoCoWorkerMixin):
    def __init__(
        self,
        rank: int,
        group: int,
        index: int,
        model_factory: ModelFactory,
        dataset_factory: DatasetFactory,
        spec: WorkerSpec,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> None:
        self.rank, self.group, self.index, self.spec = rank, group, index, spec
        load(torch, comm_hooks, datasets, flat, optim)
        torch.set_num_threads(max(1, round(spec.cpus)))
        if spec.gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"worker {rank} was given GPUs but torch.cuda is not available in its process")
        self.device = torch.device("cuda" if spec.gpus > 0 else "cpu")
        torch.manual_seed(spec.seed)  # every worker starts from the same initial weights
        self.model = model_factory().to(self.device)
        self.state = flat.FlatState(self.model)
        self.optimizer = (optimizer_factory or (lambda p: optim.build_optimizer(p, spec.optimizer)))(
            self.model.parameters()
        )
        data = dataset_factory()
        n = len(data.y_train)
        shard, self.stream = datasets.batch_stream(
            n, spec.batch_size, spec.seed, spec.num_workers, rank, spec.redeal_shards
        )
        self.x = datasets.resident(data.x_train, self.device, shard)  # ImageFiles: a lazy subset, streamed
        self.streamed = isinstance(self.x, datasets.ImageFiles)
        self.y = (data.y_train if shard is None else data.y_train[shard]).to(self.device)
        self.augment = data.augment  # whole-batch crop/flip on the worker's device (the fast path)
        self.augment_rng = torch.Generator().manual_seed(datasets.worker_seed(spec.seed, rank) + 1)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None
        if spec.lsgd.leader_estimate == "val_batch":
            # The same batch for every worker: a fixed seeded draw from the training set.
            pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(spec.seed))
            pick = pick[: spec.lsgd.val_batch_size]
            val_x = data.augment.test(data.x_train[pick]) if data.augment else data.x_train[pick]
            self.val = (val_x.to(self.device), data.y_train[pick].to(self.device))
        del data
        self.window = LossWindow(spec.lsgd.loss_window)
        self._recent: list[torch.Tensor] = []
        self.delay = spec.step_delay_s.get(rank, 0.0)
        self.steps = 0
        self.compute_s = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pulls = 0
        self.pull_s = 0.0  # time in the pull arithmetic (on a GPU: launch time only, no sync)
        self.last_loss = math.inf
        self.resets = 0  # times this worker was reset to a leader's weights (NaN/inf loss)
        self.skipped_pulls = 0  # pulls toward weights that were no longer finite
        # proximal option: the last leaders seen, pulled toward a little after every step
        cfg = spec.lsgd
        self.proximal: ProximalTargets | None = None
        if cfg.proximal > 0:
            self.proximal = ProximalTargets(cfg.proximal, cfg.tau, cfg.tau_global, spec.num_groups)
            self.proximal.start(self.state.flat)
        self._outer_init()  # DiLoCo: the global weights and outer optimizers
        if spec.data_parallel is not None and spec.data_parallel.compression != "none":
            c = spec.data_parallel
            self._grad_hook = comm_hooks.FlatGradientHook(
                c.compression, c.powersgd_rank, c.powersgd_start, c.error_feedback, c.warm_start
            )
        self._lock = threading.Lock()  # guards the pull and snapshot queues and the mode flag
        self._pending: list[tuple[np.ndarray | None, float, str]] = []  # None: a reset keeping the weights
        self._snapshot_requests: list[dict[str, Any]] = []
        self._async = False
        self._stop = threading.Event()
        self._loop_lock = threading.Lock()  # asynchronous mode: one loop at a time
        # one join or leave of the collective group at a time: a join that outlived its caller's
        # wait must not interleave with the next try's leave and join (``setup_collective``)
        self._collective_lock = threading.Lock()
        self._reports: list[Any] = []  # asynchronous mode: reports the LocalLeader may not have handled yet

    # ------------------------------------------------------------------ information

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"Worker(rank={self.rank}, group={self.group})"

    def ready(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "group": self.group,
            "node_id": node_id(),
            "node_ip": node_ip(),
            "pid": os.getpid(),
            "num_params": self.state.num_params,
            "nbytes": self.state.nbytes,
            "shard_size": self.stream.n,  # samples per epoch
            "device": str(self.device),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "steps": self.steps,
            "samples": self.steps * self.spec.batch_size,
            "compute_s": self.compute_s,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "pulls": self.pulls,
            "pull_s": self.pull_s,
            "exchanges": self.exchanges,
            "estimate": self.window.mean() if self._async else self.estimate(),
            "last_loss": self.last_loss,
            "resets": self.resets,
            "skipped_pulls": self.skipped_pulls,
        }

    # ------------------------------------------------------------------ training

    def _step(self) -> None:
        """One local step, then the proximal pull (if on); its loss joins the leader estimate."""
        loss = self._local_step()
        if self.proximal is not None:
            self.proximal.apply(self.state.flat)
        self._recent.append(loss.detach())
        self.steps += 1
        if self.delay:
            time.sleep(self.delay)

    def _local_step(self) -> torch.Tensor:
        """One optimizer step on the next batch; returns its loss."""
        index = self.stream.next()
        if self.streamed:  # decoded from disk, per-sample transforms seeded from augment_rng
            files = cast(datasets.ImageFiles, self.x)
            x, index = files.load(index, self.augment_rng).to(self.device), index.to(self.device)
        else:  # the fast path: the shard is on the device, augmented a whole batch at a time
            index = index.to(self.device)
            x = self.x[index]
            if self.augment is not None:
                x = self.augment(x, self.augment_rng)
        loss = torch.nn.functional.cross_entropy(self.model(x), self.y[index])
        self.state.zero_grad()
        loss.backward()
        self._after_backward()
        self.optimizer.step()
        return loss

    def _flush_losses(self) -> None:
        """Move this round's losses into the window: one device sync per round, not per step."""
        if self._recent:
            for value in torch.stack(self._recent).tolist():
                self.window.add(value)
            self.last_loss = value
            self._recent.clear()

    def estimate(self) -> float:
        """This worker's leader-selection estimate (lower is better; never NaN)."""
        self._flush_losses()
        if self.val is None:
            return self.window.mean()
        self.model.eval()
        with torch.no_grad():
            value = torch.nn.functional.cross_entropy(self.model(self.val[0]), self.val[1]).item()
        self.model.train()
        return value if math.isfinite(value) else math.inf

    def train(
        self,
        num_steps: int,
        local: np.ndarray | None = None,
        local_strength: float = 0.0,
        global_: np.ndarray | None = None,
        global_strength: float = 0.0,
        average: str | None = None,
        outer: int | None = None,
    ) -> dict[str, Any]:
        """Synchronous mode: apply the previous round's pulls (local, then global), then take
        ``num_steps`` local steps and return the loss estimate. Local SGD: ``average`` ("local"
        or "global") averages the weights after the steps; DiLoCo: ``outer`` is the fragment
        whose outer step follows them.

        The leader arrays arrive as top-level arguments, so Ray resolves them before the call
        runs: zero-copy views of the object store, and the leader's own snapshot is taken
        before its next step (a leader gets its own reference with strength 0).
        """
        start = time.perf_counter()
        self.apply_pulls(local, local_strength, global_, global_strength)
        self.model.train()
        for _ in range(num_steps):
            self._step()
        self.average_weights(average)
        if outer is not None:
            self.outer_sync(outer)
        estimate = self.estimate()
        self.bytes_sent += 8  # the estimate travels to the LocalLeader
        elapsed = time.perf_counter() - start
        self.compute_s += elapsed
        return {"rank": self.rank, "estimate": estimate, "compute_s": elapsed, "steps": self.steps}

    # ------------------------------------------------------------------ leader weights

    def get_weights(self, count: bool = True) -> np.ndarray:
        """This worker's flat weights, to be stored once in the object store as the leader's.

        Ray serialises the returned array into shared memory; the caller owns the object.
        While the asynchronous loop runs, a consistent snapshot is taken between steps.
        ``count=False`` for reads that are not the algorithm's traffic (evaluation, checks).
        """
        with self._lock:
            weights = self.state.to_numpy() if not self._async else None
        if weights is None:
            weights = self._between_steps("weights")
        if count:  # the algorithm's traffic: in the run's comm_dtype
            weights = encode(weights, self.spec.comm_dtype)
            self.bytes_sent += weights.nbytes
        return weights

    def pull(
        self, leader: np.ndarray, strength: float, inspect: bool = False, kind: str = "global"
    ) -> dict[str, Any] | None:
        """``x ← x − strength·(x − leader)``; ``leader`` is a read-only view of the object store.

        Strength 0: the leader's own weights, only stored as its proximal target (not traffic).
        With ``inspect`` it also says where that array lives (for the zero-copy tests).
        """
        if strength > 0:
            self.bytes_received += leader.nbytes
        where = memory_region(leader) if inspect else None
        with self._lock:
            if self._async:  # only the newest leader of each kind matters: drop (and unpin) older ones
                self._pending = [p for p in self._pending if p[2] != kind] + [(leader, strength, kind)]
            else:
                self._apply_pull(leader, strength, kind)
        return where

    def apply_pulls(
        self,
        local: np.ndarray | None,
        local_strength: float,
        global_: np.ndarray | None = None,
        global_strength: float = 0.0,
    ) -> None:
        """Synchronous mode: the local pull, then the global one, in one call (order matters:
        two pulls do not commute, and separate calls to this threaded actor may overlap).
        A leader is sent its own weights with strength 0 (see ``_apply_pull``)."""
        with self._lock:
            for leader, strength, kind in ((local, local_strength, "local"), (global_, global_strength, "global")):
                if leader is not None:
                    self.bytes_received += leader.nbytes if strength > 0 else 0
                    self._apply_pull(leader, strength, kind)

    def _apply_pull(self, leader: np.ndarray, strength: float, kind: str) -> None:
        """Pull toward ``leader`` with ``strength`` and store it as the proximal target of its
        ``kind``. Strength 0 (this worker is the leader) only stores it, and only when there is
        a proximal pull to feed."""
        if strength <= 0 and self.proximal is None:
            return
        start = time.perf_counter()
        source = self.on_device(leader)  # on a GPU: one host-to-device copy
        if not flat.all_finite(source):  # the leader diverged after it was chosen (its last step)
            self.skipped_pulls += 1 if strength > 0 else 0
            return
        if strength > 0:
            pull_toward(self.state.flat, source, strength)
            self.pull_s += time.perf_counter() - start
            self.pulls += 1
        if self.proximal is not None:  # keep the leader (a view of the object store) for the per-step pull
            self.proximal.refresh(kind, source)

    def load_weights(self, weights: np.ndarray) -> None:
        with self._lock:
            self.state.load(weights)

    # ------------------------------------------------------------------ recovery

    def reset_to(self, weights: np.ndarray | None, steps: int | None = None) -> None:
        """Start again from ``weights`` (the leader's; ``None``: keep these): fresh optimizer
        state and loss window. For a worker whose loss went NaN/inf, or a replacement worker
        (``steps``: the group's step count, so budgets and schedules stay in step)."""
        with self._lock:
            if self._async:  # the training thread applies it between two steps
                self._pending.append((weights, 1.0, "reset"))
                return
            self._reset(weights)
        if steps is not None:
            self.steps = steps

    def _reset(self, weights: np.ndarray | None) -> None:
        if weights is not None:
            self.state.load(self.on_device(weights))
        self.optimizer.state.clear()
        self.window.load([])
        self._recent.clear()
        if self.proximal is not None:  # a fresh start: the weights it starts from are the targets
            self.proximal.start(self.state.flat)
        self.resets += 1


def memory_region(array: np.ndarray) -> dict[str, Any]:
    """The ``/proc/self/maps`` line holding ``array``'s data, and whether it is writeable.

    A zero-copy object-store array lies in a ``/dev/shm/plasma*`` mapping shared by the node.
    """
    pointer = array.ctypes.data
    mapping = ""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= pointer < high:
                mapping = fields[5].strip() if len(fields) > 5 else "[anonymous]"
                break
    return {"writeable": bool(array.flags.writeable), "mapping": mapping, "nbytes": int(array.nbytes)}
