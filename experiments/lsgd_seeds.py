"""LSGD over several seeds: the leader's test error against training time, and a summary.

Reads top to bottom. Each seed is one `lsgd_ray.fit` run; everything needed to reproduce it
(config, seed, code version, command line) is saved next to its metrics.

    .venv/bin/python experiments/lsgd_seeds.py                                   # digits, offline
    .venv/bin/python experiments/lsgd_seeds.py --dataset fashion-mnist --data-dir ../shared/data \
        --model cnn --batch-size 128 --time-budget 120 --seeds 0 1 2

Output (default experiments/results/<dataset>-<time>/):
    seed<k>/result.json, seed<k>/tensorboard/, seed<k>/leader_state_dict.pt   one run each
    curves.csv        seed, train_s, samples, leader, test_error (the evaluated model's), and
                      leader_test_error, center_test_error (both are recorded at every evaluation)
    summary.json      median / min / max final accuracy, code version, config, command
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import ray

from lsgd_ray import DATASETS, LSGDConfig, TrainConfig, dataset_factory, fit, model_factory
from lsgd_ray.results import code_version

REPO = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
parser.add_argument("--data-dir", default=None)
parser.add_argument("--model", default="mlp")
parser.add_argument("--groups", type=int, default=2)
parser.add_argument("--workers-per-group", type=int, default=2)
parser.add_argument("--tau", type=int, default=4)
parser.add_argument("--tau-global", type=int, default=16)
parser.add_argument("--lam", type=float, default=0.1)
parser.add_argument("--lam-global", type=float, default=0.1)
parser.add_argument("--mode", default="sync", choices=["sync", "async"])
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=None)
parser.add_argument("--epochs", type=float, default=None)
parser.add_argument("--time-budget", type=float, default=None)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--out", default=None)
parser.add_argument("--address", default=None, help="Ray cluster address; default: a local instance")
args = parser.parse_args()

spec = DATASETS[args.dataset]
out = Path(args.out or f"experiments/results/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}")
out.mkdir(parents=True, exist_ok=True)
data = dataset_factory(args.dataset, args.data_dir)  # fails here, clearly, if the files are missing
model = model_factory(args.model, spec.input_shape, spec.num_classes)
base = TrainConfig(
    num_groups=args.groups,
    workers_per_group=args.workers_per_group,
    lsgd=LSGDConfig(lam=args.lam, lam_global=args.lam_global, tau=args.tau, tau_global=args.tau_global, mode=args.mode),
    batch_size=args.batch_size or spec.default_batch_size,
    epochs=args.epochs if (args.epochs or args.time_budget) else 20.0,
    time_budget_s=args.time_budget,
    eval_every_s=2.0,
)
base = replace(base, optimizer=replace(base.optimizer, lr=args.lr))

# One run per seed, all on one Ray instance (started here unless --address names a cluster).
ray.init(
    address=args.address or "local",
    **({} if args.address else {"num_cpus": max(os.cpu_count() or 1, args.groups * args.workers_per_group)}),
    logging_level="WARNING",
)
results = []
for seed in args.seeds:
    print(f"--- seed {seed}", flush=True)
    config = replace(base, seed=seed, output_dir=str(out / f"seed{seed}"))
    results.append((seed, fit(model, data, config, run_name=f"lsgd-{args.dataset}")))

# Curves: test error against training time (evaluation excluded): the evaluated model, the leader, the center.
with open(out / "curves.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["seed", "train_s", "samples", "leader", "test_error", "leader_test_error", "center_test_error"])
    for seed, result in results:
        for r in result.history:
            both = [1 - r["leader_test_accuracy"], 1 - r["center_test_accuracy"]]
            writer.writerow([seed, r["train_s"], r["samples"], r["leader"], 1 - r["test_accuracy"], *both])

# Summary.
accuracies = [r.final_test_accuracy for _, r in results]
summary = {
    "dataset": args.dataset,
    "model": args.model,
    "seeds": args.seeds,
    "final_test_accuracy": {
        "median": statistics.median(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "per_seed": dict(zip(map(str, args.seeds), accuracies)),
    },
    "train_s_median": statistics.median(r.timings["train_s"] for _, r in results),
    "code_version": code_version(REPO),
    "command": " ".join([sys.executable, *sys.argv]),
    "config": base.to_dict(),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
ray.shutdown()
print(
    f"median final leader accuracy {summary['final_test_accuracy']['median']:.4f} "
    f"(min {min(accuracies):.4f}, max {max(accuracies):.4f}) over seeds {args.seeds}; written to {out}"
)
