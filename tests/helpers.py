"""Plain single-process PyTorch references for the exactness tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsgd_ray.config import TrainConfig
from lsgd_ray.data import BatchStream, shard_indices, worker_seed
from lsgd_ray.flat import flatten_state
from lsgd_ray.optim import build_optimizer


def plain_loop(rank: int, num_workers: int, steps: int, cfg: TrainConfig, model_fn, data_fn):
    """What worker ``rank`` computes on its own: same seed, shard, batch order and optimizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        model = model_fn()
        optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        data = data_fn()
        shard = shard_indices(len(data.y_train), num_workers, rank, cfg.seed)
        x, y = data.x_train[shard], data.y_train[shard]
        stream = BatchStream(len(shard), cfg.batch_size, worker_seed(cfg.seed, rank))
        losses = []
        for _ in range(steps):
            index = stream.next()
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return flatten_state(model), losses
    finally:
        torch.set_num_threads(threads)
