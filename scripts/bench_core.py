"""Benchmark of LSGD's hot path, printing figures (ratios against baselines run side by side).

1. Throughput: samples/s of LSGD with W workers on one node against W independent plain
   PyTorch loops (separate processes, one torch thread each, same model, data and optimizer),
   for several communication periods τ (τ_G = 4τ). Goal: ratio >= 0.95 at τ >= 8.
2. Leader broadcast: W workers on one node pull a leader of S bytes that is already in the
   object store, against one in-memory copy of S bytes on that node. Goal: <= 2x, and the
   array each worker reads is the shared object itself (no per-worker deserialisation copy).

    .venv/bin/python scripts/bench_core.py                      # both parts, defaults below
    .venv/bin/python scripts/bench_core.py --part broadcast --sizes-mb 1 10 100
    .venv/bin/python scripts/bench_core.py --data-dir ../shared/data   # Fashion-MNIST instead of random images

Writes the figures to --out (JSON) as well.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig, Trainer  # noqa: E402
from lsgd_ray.data import (  # noqa: E402
    BatchStream,
    dataset_factory,
    random_images,  # noqa: E402,F401 (also imported from here by other scripts)
    shard_indices,
    worker_seed,
)
from lsgd_ray.models import small_cnn  # noqa: E402
from lsgd_ray.optim import torch_optimizer  # noqa: E402

# --------------------------------------------------------------------------- 1. throughput


def plain_loop(rank: int, num_workers: int, steps: int, batch: int, data_fn, model_fn, opt_cfg, barrier) -> float:
    """One independent plain PyTorch training loop; returns its training seconds."""
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = model_fn()
    optimizer = torch_optimizer(model.parameters(), opt_cfg)  # a plain PyTorch loop's
    data = data_fn()
    shard = shard_indices(len(data.y_train), num_workers, rank, 0)
    x, y = data.x_train[shard], data.y_train[shard]
    stream = BatchStream(len(shard), batch, worker_seed(0, rank))

    def train(num_steps: int) -> None:
        for _ in range(num_steps):
            index = stream.next()
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()

    train(steps)  # warm up as the LSGD side does (allocator, kernel caches)
    barrier.wait()
    start = time.perf_counter()
    train(steps)
    return time.perf_counter() - start


def independent_samples_per_s(workers: int, steps: int, batch: int, data_fn, model_fn, opt_cfg) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        with ctx.Pool(workers) as pool:
            args = [(r, workers, steps, batch, data_fn, model_fn, opt_cfg, barrier) for r in range(workers)]
            seconds = pool.starmap(plain_loop, args)
    return workers * steps * batch / max(seconds)


def lsgd_samples_per_s(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Samples/s over ``steps`` more steps per worker, and the coordination share of round time."""
    before = trainer.status()
    trainer.run_rounds(max_step=before["step"] + steps)  # warm
    start_status = trainer.status()
    begin = time.perf_counter()
    status = trainer.run_rounds(max_step=start_status["step"] + steps)
    seconds = time.perf_counter() - begin
    n = trainer.topology.num_workers
    wall = status["round_wall_s"] - start_status["round_wall_s"]
    compute = status["round_compute_s"] - start_status["round_compute_s"]
    return n * steps * trainer.config.batch_size / seconds, 1 - compute / wall


def bench_throughput(args, data_fn, model_fn) -> list[dict]:
    opt_cfg = OptimizerConfig(lr=0.01)
    rows = []
    for workers in args.workers:
        groups = 2 if workers >= 4 else 1
        for tau in args.taus:
            cfg = TrainConfig(
                num_groups=groups,
                workers_per_group=workers // groups,
                batch_size=args.batch,
                max_steps=10**9,
                optimizer=opt_cfg,
                lsgd=LSGDConfig(tau=tau, tau_global=4 * tau),
                output_dir=os.path.join(args.tmp, f"throughput-w{workers}-t{tau}"),
                quiet=True,
            )
            steps = max(args.steps, 4 * tau)
            ratios, lsgd_rates, plain_rates, coordination = [], [], [], []
            with Trainer(model_fn, data_fn, cfg) as trainer:
                for _ in range(args.repeats):  # alternate A/B so drift hits both sides alike
                    rate, coord = lsgd_samples_per_s(trainer, steps)
                    plain = independent_samples_per_s(workers, steps, args.batch, data_fn, model_fn, opt_cfg)
                    lsgd_rates.append(rate)
                    plain_rates.append(plain)
                    ratios.append(rate / plain)
                    coordination.append(coord)
            row = {
                "workers": workers,
                "groups": groups,
                "tau": tau,
                "tau_global": 4 * tau,
                "steps_per_worker": steps,
                "lsgd_samples_per_s": statistics.median(lsgd_rates),
                "independent_samples_per_s": statistics.median(plain_rates),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "coordination_share_of_round": statistics.median(coordination),
            }
            rows.append(row)
            print(
                f"throughput W={workers} ({groups}x{workers // groups}) tau={tau:>3}: "
                f"LSGD {row['lsgd_samples_per_s']:8.0f}/s  independent {row['independent_samples_per_s']:8.0f}/s  "
                f"ratio {row['ratio']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]  "
                f"coordination {100 * row['coordination_share_of_round']:.1f}% of round time",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------- 2. leader broadcast


class Blob(nn.Module):
    """A model that is only a parameter vector of a given size (nothing is trained)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))

    def forward(self, x):  # pragma: no cover - never trained here
        return x


def copy_seconds(nbytes: int, repeats: int, copies: int = 1) -> float:
    """Median seconds for ``copies`` threads each copying the same ``nbytes`` source into a buffer
    of its own at once: the memory passes that ``copies`` pullers of one leader cannot avoid
    (numpy releases the GIL while it copies)."""
    src = np.random.default_rng(0).random(nbytes // 8)
    dsts = [np.empty_like(src) for _ in range(copies)]
    with ThreadPoolExecutor(copies) as pool:
        list(pool.map(lambda dst: np.copyto(dst, src), dsts))  # fault the pages in first
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            list(pool.map(lambda dst: np.copyto(dst, src), dsts))
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def bench_broadcast(args) -> list[dict]:
    rows = []
    for size_mb in args.sizes_mb:
        numel = int(size_mb * 2**20) // 4
        for workers in args.workers:
            cfg = TrainConfig(
                num_groups=1,
                workers_per_group=workers,
                max_steps=1,
                output_dir=os.path.join(args.tmp, f"broadcast-{size_mb}"),
                quiet=True,
            )
            data_fn = functools.partial(random_images, n_train=256, n_test=16)
            with Trainer(functools.partial(Blob, numel), data_fn, cfg) as trainer:
                leader, followers = trainer.workers[0], trainer.workers[1:] or trainer.workers
                publish, pulls, per_worker = [], [], []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    ref = leader.get_weights.remote()
                    ray.wait([ref], fetch_local=False)
                    publish.append(time.perf_counter() - begin)
                    ray.get(followers[0].pull.remote(ref, 0.0))  # the object is sealed and local
                    begin = time.perf_counter()
                    ray.get([w.pull.remote(ref, 0.1) for w in followers])
                    pulls.append(time.perf_counter() - begin)
                    where = ray.get([w.pull.remote(ref, 0.0, True) for w in followers])  # untimed check
                    del ref
                stats = ray.get([w.stats.remote() for w in followers])
                per_worker = [s.get("pull_s", 0.0) / max(s["pulls"], 1) for s in stats]
            copy = copy_seconds(numel * 4, args.repeats)
            copies = copy_seconds(numel * 4, args.repeats, len(followers))
            zero_copy = all("plasma" in w["mapping"] and not w["writeable"] for w in where)
            row = {
                "size_mb": size_mb,
                "workers": workers,
                "pullers": len(followers),
                "copy_s": copy,
                "publish_s": statistics.median(publish),
                "pull_all_s": statistics.median(pulls),
                "pull_kernel_s_per_worker": statistics.median(per_worker),
                "pull_all_over_copy": statistics.median(pulls) / copy,
                "copies_s": copies,  # one copy per puller, all at once: the per-worker memory-pass bound
                "pull_all_over_copies": statistics.median(pulls) / copies,
                "pull_kernel_over_copy": statistics.median(per_worker) / copy,
                "zero_copy": zero_copy,
            }
            rows.append(row)
            print(
                f"broadcast {size_mb:>6} MB to {len(followers)} worker(s): copy {1e3 * copy:7.2f} ms  "
                f"publish {1e3 * row['publish_s']:7.2f} ms  all pulls {1e3 * row['pull_all_s']:7.2f} ms "
                f"({row['pull_all_over_copy']:.2f}x copy, {row['pull_all_over_copies']:.2f}x {len(followers)} "
                f"concurrent copies of {1e3 * copies:.2f} ms)  one pull's arithmetic {1e3 * row['pull_kernel_s_per_worker']:7.2f} ms "
                f"({row['pull_kernel_over_copy']:.2f}x copy)  zero-copy={zero_copy}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "throughput", "broadcast"], default="all")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=96, help="steps per worker per measurement")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100])
    parser.add_argument("--data-dir", default=None, help="use Fashion-MNIST from here instead of random images")
    parser.add_argument("--out", default="runs/bench_core.json")
    parser.add_argument("--tmp", default="runs/bench_core_tmp")
    args = parser.parse_args()

    data_fn = dataset_factory("fashion-mnist", args.data_dir) if args.data_dir else random_images
    model_fn = functools.partial(small_cnn, (1, 28, 28), 10)
    ray.init(address="local", num_cpus=max(8, 2 * max(args.workers)), include_dashboard=False, logging_level="WARNING")
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__},
        "model": "small_cnn(1x28x28 -> 10)",
        "data": "fashion-mnist" if args.data_dir else "random 1x28x28 images",
        "batch": args.batch,
    }
    try:
        if args.part in ("all", "throughput"):
            report["throughput"] = bench_throughput(args, data_fn, model_fn)
        if args.part in ("all", "broadcast"):
            report["broadcast"] = bench_broadcast(args)
    finally:
        ray.shutdown()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
