"""LSGD against its peers, several seeds each: the paper's test-error-versus-time comparison.

Reads top to bottom. Every (algorithm, seed) is one `lsgd_ray.fit` run on one Ray instance,
with the same workers, data, model, local optimizer and training-time budget. A config file
(experiments/configs/*.json) holds a figure's settings; flags override it.

    .venv/bin/python experiments/compare.py --config experiments/configs/fashion_mnist_cnn7.json \
        --data-dir ../shared/data
    .venv/bin/python experiments/compare.py --dataset digits --model cnn --time-budget 10 --seeds 0

Output (default experiments/results/compare-<dataset>-<time>/):
    <algorithm>/seed<k>/   result.json, tensorboard/, leader_state_dict.pt of each run
    config.json            the settings, code version and command line
    curves.csv             algorithm, seed, train_s, samples, leader, test_error (LSGD also
                           leader_test_error and center_test_error)
    summary.json           per algorithm: final accuracy and time to --target (median, min, max)
    test_error_vs_time.png the evaluated model's test error against training time, per algorithm
                           (LSGD: its leader and its center, the one not evaluated dashed)
    leaders.png            LSGD: the global leader over training, and how often each worker led
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ray

from lsgd_ray import ALGORITHMS, DATASETS, EASGDConfig, LSGDConfig, TrainConfig, dataset_factory, fit, model_factory
from lsgd_ray.data import dataset_spec
from lsgd_ray.results import code_version, test_error_curves

REPO = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default=None, help="a JSON file of these options (flags given here win)")
parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
parser.add_argument("--data-dir", default=None)
parser.add_argument("--model", default="cnn")
parser.add_argument("--augment", default=None)
parser.add_argument("--algorithms", nargs="+", default=["lsgd", "easgd", "downpour", "data_parallel"])
parser.add_argument("--groups", type=int, default=2)
parser.add_argument("--workers-per-group", type=int, default=2)
parser.add_argument("--cpus-per-worker", type=float, default=1.0)
parser.add_argument("--gpus-per-worker", type=float, default=0.0)
parser.add_argument("--tau", type=int, default=4, help="LSGD local period; EASGD's and DOWNPOUR's period")
parser.add_argument("--tau-global", type=int, default=16)
parser.add_argument("--lam", type=float, default=0.1)
parser.add_argument("--lam-global", type=float, default=0.1)
parser.add_argument("--easgd-alpha", type=float, default=None, help="default: β/p with β = 0.9")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--lr-for", nargs="*", default=[], help="per-algorithm learning rates, e.g. downpour=0.0125")
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--time-budget", type=float, default=60.0, help="training seconds per run")
parser.add_argument("--eval-every", type=float, default=5.0)
parser.add_argument("--target", type=float, default=None, help="test accuracy for time-to-accuracy")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--out", default=None)
parser.add_argument("--address", default=None, help="Ray cluster address; default: a local instance")
cli = parser.parse_args()
if cli.config:  # the file fills in what the command line left at its defaults
    given = {a.dest for a in parser._actions if any(opt in sys.argv for opt in a.option_strings)}
    for key, value in json.loads(Path(cli.config).read_text()).items():
        if key.replace("-", "_") not in given:
            setattr(cli, key.replace("-", "_"), value)
args = cli
for name in args.algorithms:
    if name not in ALGORITHMS:
        parser.error(f"unknown algorithm {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
lr_for = {}
for item in args.lr_for:
    name, _, value = item.partition("=")
    if name not in args.algorithms or not value:
        parser.error(f"--lr-for takes ALGORITHM=LR for one of {', '.join(args.algorithms)}, got {item!r}")
    lr_for[name] = float(value)

out = Path(args.out or f"experiments/results/compare-{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}")
out.mkdir(parents=True, exist_ok=True)
data = dataset_factory(args.dataset, args.data_dir, augment=args.augment)  # missing files fail here, clearly
spec = dataset_spec(args.dataset, args.data_dir)  # imagenet: the class count of its folder
model = model_factory(args.model, spec.model_input_shape(args.augment), spec.num_classes)
base = TrainConfig(
    num_groups=args.groups,
    workers_per_group=args.workers_per_group,
    cpus_per_worker=args.cpus_per_worker,
    gpus_per_worker=args.gpus_per_worker,
    lsgd=LSGDConfig(lam=args.lam, lam_global=args.lam_global, tau=args.tau, tau_global=args.tau_global),
    easgd=EASGDConfig(tau=args.tau, alpha=args.easgd_alpha),
    batch_size=args.batch_size,
    time_budget_s=args.time_budget,
    eval_every_s=args.eval_every,
    quiet=True,
)
base = replace(base, optimizer=replace(base.optimizer, lr=args.lr))
base = replace(base, downpour=replace(base.downpour, n_push=args.tau, n_fetch=args.tau))
record = {"args": vars(args), "code_version": code_version(REPO), "command": " ".join([sys.executable, *sys.argv])}
(out / "config.json").write_text(json.dumps({**record, "train_config": base.to_dict()}, indent=2))

ray.init(
    address=args.address or "local",
    **({} if args.address else {"num_cpus": max(os.cpu_count() or 1, args.groups * args.workers_per_group)}),
    logging_level="WARNING",
)
results: dict[str, list] = {name: [] for name in args.algorithms}
for seed in args.seeds:  # seeds outermost: a slow drift of the machine hits every algorithm alike
    for name in args.algorithms:
        config = replace(base, algorithm=name, seed=seed, output_dir=str(out / name / f"seed{seed}"))
        config = replace(config, optimizer=replace(config.optimizer, lr=lr_for.get(name, args.lr)))
        result = fit(model, data, config, run_name=name)
        results[name].append((seed, result))
        print(f"{name:>14} seed {seed}: {result.evaluated} test accuracy {result.final_test_accuracy:.4f}", flush=True)
ray.shutdown()


def time_to(history: list[dict], target: float) -> float | None:
    """Training seconds to the first evaluation at or above ``target`` (evaluation excluded)."""
    return next((h["train_s"] for h in history if h["test_accuracy"] >= target), None)


with open(out / "curves.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        ["algorithm", "seed", "train_s", "samples", "leader", "test_error", "leader_test_error", "center_test_error"]
    )
    for name, runs in results.items():
        for seed, r in runs:
            for h in r.history:
                both = [1 - h[k] if k in h else "" for k in ("leader_test_accuracy", "center_test_accuracy")]
                writer.writerow([name, seed, h["train_s"], h["samples"], h["leader"], 1 - h["test_accuracy"], *both])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


summary = {}
for name, runs in results.items():
    accuracies = [r.final_test_accuracy for _, r in runs]
    entry = {"final_test_accuracy": spread(accuracies), "evaluated": runs[0][1].evaluated}
    if args.target is not None:
        times = [time_to(r.history, args.target) for _, r in runs]
        reached = [t for t in times if t is not None]
        entry["time_to_target_s"] = spread(reached)
        entry["reached_target"] = f"{len(reached)}/{len(times)}"
    entry["bytes_per_worker_step"] = spread([r.communication["bytes_per_worker_step"] for _, r in runs])
    entry["diverged"] = f"{sum(r.status == 'diverged' for _, r in runs)}/{len(runs)}"  # see docs/divergence.md
    summary[name] = entry
(out / "summary.json").write_text(json.dumps({**record, "target": args.target, "algorithms": summary}, indent=2))

# The paper's figure: test error of the evaluated model against training time, one line per
# algorithm (each seed drawn thin, the first seed labelled). LSGD records both its leader and
# its center: the one it evaluates solid, the other dashed.
fig, ax = plt.subplots(figsize=(7, 4.5))
for k, (name, runs) in enumerate(results.items()):
    for i, (_seed, r) in enumerate(runs):
        evaluated = r.evaluated.split(" (")[0]  # "leader", "center", ...
        for model, (times, errors) in test_error_curves(r.history).items():
            ax.plot(
                times,
                errors,
                color=f"C{k}",
                linestyle="-" if model in ("", evaluated) else "--",
                alpha=1.0 if i == 0 else 0.4,
                label=f"{name} ({model or evaluated})" if i == 0 else None,
            )
ax.set(xlabel="training time (s, evaluation excluded)", ylabel="test error", yscale="log")
ax.set_title(f"{args.dataset}, {args.model}, {args.groups}x{args.workers_per_group} workers, seeds {args.seeds}")
ax.legend()
fig.tight_layout()
fig.savefig(out / "test_error_vs_time.png", dpi=120)

if "lsgd" in results:  # which worker led, over training, and how often
    seed, r = results["lsgd"][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    changes = [tuple(c) for c in r.leader_changes]  # (step, worker) whenever the leader changed
    if changes:
        steps = [step for step, _ in changes] + [max(r.steps_per_worker, changes[-1][0])]
        left.step(steps, [rank for _, rank in changes] + [changes[-1][1]], where="post")
    left.set(xlabel="step", ylabel="global leader (worker)", title=f"LSGD leader over training (seed {seed})")
    left.set_yticks(range(len(r.leader_counts)))
    right.bar(range(len(r.leader_counts)), r.leader_counts)
    right.set_xticks(range(len(r.leader_counts)))
    right.set(xlabel="worker", ylabel="rounds as global leader", title="how often each worker led")
    fig.tight_layout()
    fig.savefig(out / "leaders.png", dpi=120)

for name, entry in summary.items():
    line = f"{name:>14}: final accuracy median {entry['final_test_accuracy']['median']:.4f}"
    line += f" (min {entry['final_test_accuracy']['min']:.4f}, max {entry['final_test_accuracy']['max']:.4f})"
    if args.target is not None and entry["time_to_target_s"]:
        line += f"; {args.target:.0%} after {entry['time_to_target_s']['median']:.1f}s ({entry['reached_target']})"
    elif args.target is not None:
        line += f"; never reached {args.target:.0%}"
    if not entry["diverged"].startswith("0/"):
        line += f"; diverged in {entry['diverged']} runs"
    print(line)
print(f"written to {out}")
