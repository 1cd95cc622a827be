"""The data every dataset gives (``Dataset``), worker shards and the batch stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lsgd_ray.augment import Augment

if TYPE_CHECKING:
    from lsgd_ray.data.streamed import ImageFiles


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says how to get them."""


class DatasetFileError(ValueError):
    """A dataset file that cannot be read as what it should be (damaged, truncated, of another
    format); the message starts with the file's path."""


@dataclass
class Dataset:
    """Train and test splits as tensors (inputs already normalised, labels int64). Inputs too
    large for memory are :class:`ImageFiles` instead, decoded batch by batch; labels stay tensors."""

    name: str
    x_train: torch.Tensor | ImageFiles
    y_train: torch.Tensor
    x_test: torch.Tensor | ImageFiles
    y_test: torch.Tensor
    num_classes: int
    augment: Augment | None = None  # applied to each training batch; its ``test`` view to the test split

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What the model sees (after the augmentation's crop)."""
        shape = tuple(self.x_train.shape[1:])
        return self.augment.output_shape(shape) if self.augment else shape


DatasetFactory = Callable[[], Dataset]


# --------------------------------------------------------------------------- sharding & batches


def shard_indices(n: int, num_shards: int, shard: int, seed: int) -> torch.Tensor:
    """Disjoint shards of ``range(n)``: a seeded permutation dealt round-robin."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return permutation[shard::num_shards]


class BatchStream:
    """An endless stream of index batches of a fixed size over ``range(n)``.

    Each epoch is a fresh permutation from the stream's own generator; a batch that crosses an
    epoch boundary takes the rest of one permutation and the start of the next, so every batch
    has the same size and epochs count exactly in samples.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("cannot draw batches from an empty shard")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n, generator=self.generator)
        self._pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self._pos == self.n:
                self._order, self._pos = self._next_epoch(), 0
            take = min(need, self.n - self._pos)
            parts.append(self._order[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _next_epoch(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator)

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "pos": self._pos}

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state()`` was taken (same shard size)."""
        if "order" not in state or len(state["order"]) != self.n:
            raise ValueError(f"batch stream state is not for a fixed shard of {self.n} samples")
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"].clone(), int(state["pos"])


class DealtStream(BatchStream):
    """An endless stream of index batches of rank ``rank``'s share of ``range(n)``, the shares
    re-dealt every epoch as torch's ``DistributedSampler`` with ``set_epoch(epoch)`` deals them:
    one permutation of ``range(n)`` seeded with ``seed + epoch`` (the same on every rank),
    padded to a multiple of ``num_workers`` with its own first indices, dealt round-robin.

    Every rank's share has ``ceil(n / num_workers)`` samples, so epochs stay in step across
    workers; a batch that crosses an epoch takes the rest of one share and the start of the
    next, as ``BatchStream`` does. Indices are into the whole ``range(n)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, num_workers: int = 1, rank: int = 0) -> None:
        # not BatchStream's: the order is dealt from (seed, epoch), not drawn from a generator
        if n <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        if not 0 <= rank < num_workers:
            raise ValueError(f"rank {rank} out of range for {num_workers} workers")
        self.batch_size, self.seed, self.num_workers, self.rank = batch_size, seed, num_workers, rank
        self.size = n
        self.n = -(-n // num_workers)  # the share of each rank, in samples
        self.epoch, self._pos = 0, 0
        self._order = self._deal(0)

    def _deal(self, epoch: int) -> torch.Tensor:
        permutation = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        total = self.n * self.num_workers
        if total > self.size:  # pad with the permutation's own start (repeated if need be)
            permutation = permutation.repeat(-(-total // self.size))[:total]
        return permutation[self.rank : total : self.num_workers]

    def _next_epoch(self) -> torch.Tensor:
        self.epoch += 1
        return self._deal(self.epoch)

    def state(self) -> dict:
        return {"dealt": True, "epoch": self.epoch, "pos": self._pos, "size": self.size}

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state()`` was taken (same dataset and number of workers)."""
        if not state.get("dealt") or state["size"] != self.size:
            raise ValueError(
                f"batch stream state is not for shares re-dealt each epoch over {self.size} samples: "
                f"the run was checkpointed with other data or other sharding"
            )
        self.epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = self._deal(self.epoch)


def batch_stream(
    n: int, batch_size: int, seed: int, num_workers: int, rank: int, redeal: bool
) -> tuple[torch.Tensor | None, BatchStream | DealtStream]:
    """Rank ``rank``'s rows of a training split of ``n`` samples and its batch stream.

    Fixed shards (``redeal=False``): the rows of its shard (``shard_indices``) and a stream of
    indices into them. Re-dealt shards: ``None`` (the worker keeps the whole split) and a
    ``DealtStream`` of indices into it. The same call in a worker and in a baseline loop gives
    the same batches."""
    if redeal:
        return None, DealtStream(n, batch_size, seed, num_workers, rank)
    shard = shard_indices(n, num_workers, rank, seed)
    return shard, BatchStream(len(shard), batch_size, worker_seed(seed, rank))


def worker_seed(seed: int, rank: int) -> int:
    """Seed of worker ``rank``'s batch order (model initialisation uses ``seed`` itself)."""
    return seed * 1_000_003 + 7919 * (rank + 1)
