"""Bytes per worker-step of every algorithm against theory, all on one local Ray.

    python scripts/bench_comm.py [--groups 2 --workers-per-group 2 --epochs 4 --hidden 256]

Each algorithm trains the same MLP on the same synthetic data; the table shows the measured
bytes a worker received (and sent) per step, the theory from ``lsgd_ray.algorithms.communication``
and their ratio. Results also go to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import ray

from lsgd_ray import EASGDConfig, TrainConfig, fit
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp

RUNS = ["lsgd", "data_parallel", "local_sgd", "easgd", "easgd_async", "downpour", "dpsgd", "aldsgd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--workers-per-group", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--output", default="runs/bench_comm.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sizes = [args.workers_per_group] * args.groups
    ray.init(address="local", num_cpus=max(8, sum(sizes)), include_dashboard=False, logging_level="WARNING")
    model = functools.partial(mlp, (16,), 4, hidden=args.hidden)
    data = functools.partial(synthetic, n_train=4096, n_test=512)
    rows = []
    print(f"{'algorithm':<14} {'received/step':>14} {'theory':>12} {'ratio':>7} {'sent/step':>12} {'theory':>12}")
    for name in RUNS:
        algorithm = name.removesuffix("_async")
        extra = {"easgd": EASGDConfig(mode="async")} if name == "easgd_async" else {}
        cfg = TrainConfig(
            algorithm=algorithm,
            num_groups=args.groups,
            workers_per_group=args.workers_per_group,
            batch_size=32,
            epochs=args.epochs,
            eval_every_s=5.0,
            quiet=True,
            output_dir=os.path.join(os.path.dirname(args.output) or ".", f"bench_comm-{name}"),
            **extra,
        )
        result = fit(model, data, cfg)
        comm = result.communication
        theory = expected_bytes(cfg, comm["weight_bytes"], sizes)
        row = {
            "algorithm": name,
            "weight_bytes": comm["weight_bytes"],
            "received_per_worker_step": comm["bytes_received_per_worker_step"],
            "sent_per_worker_step": comm["bytes_sent_per_worker_step"],
            "theory_received": theory["received"],
            "theory_sent": theory["sent"],
            "ratio_received": comm["bytes_received_per_worker_step"] / theory["received"],
            "test_accuracy": result.final_test_accuracy,
        }
        rows.append(row)
        print(
            f"{name:<14} {row['received_per_worker_step']:>14,.0f} {row['theory_received']:>12,.0f} "
            f"{row['ratio_received']:>7.3f} {row['sent_per_worker_step']:>12,.0f} {row['theory_sent']:>12,.0f}",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"groups": args.groups, "workers_per_group": args.workers_per_group, "rows": rows}, f, indent=2)
    print(f"weights: {rows[0]['weight_bytes']:,} bytes; results in {args.output}")
    ray.shutdown()


if __name__ == "__main__":
    main()
