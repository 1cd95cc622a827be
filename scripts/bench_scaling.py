"""Scaling of LSGD's coordination cost per round (the time a synchronous round spends outside
the workers' training steps) as the work grows, with a plot.

1. Workers: one node (a local Ray), one group of W workers for W in --workers.
2. Nodes: ray.cluster_utils.Cluster, a head without CPUs plus N simulated nodes for N in
   --nodes, each with --workers-per-node CPUs and one group of that many workers on it.

A round's wall time is measured by the GlobalLeader around its whole round (dispatch to the
LocalLeaders, their calls to the workers, leader selection, publishing the leader's weights);
its compute time is the slowest worker's time inside ``Worker.train`` (the pulls' arithmetic,
the steps, the loss estimate). Coordination per round = (wall - compute) / rounds.
Goal: it grows no faster than linearly in workers per node and in nodes.

With one group LSGD has only the global leader, so a round is τ_G = 4τ steps; with several
groups a round is τ steps (a local pull, and every 4th round a global one, is due).
Repeats run on the same actors one after another, after a warm-up.

    .venv/bin/python scripts/bench_scaling.py                    # both parts, defaults below
    .venv/bin/python scripts/bench_scaling.py --part nodes --nodes 1 2 4 --workers-per-node 2
    .venv/bin/python scripts/bench_scaling.py --workers 1 2 --nodes 1 2 --rounds 4 --repeats 1   # smoke size

Writes the figures to --out (JSON, after every configuration) and the plot to --plot (PNG).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# scripts/ is sys.path[0] when this file runs as a script: bench_core is its sibling
import bench_core  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig, Trainer  # noqa: E402
from lsgd_ray.models import mlp  # noqa: E402

# Ray's worker processes need not have scripts/ on their path: send bench_core's functions by value.
ray.cloudpickle.register_pickle_by_value(bench_core)

# An MLP keeps the steps short, so coordination is a visible part of a round on 2 cores; its
# 118,282 parameters (473 KB) are above Ray's 100 KB inlining limit, so the leader's weights
# travel through the object store as in real runs.
MODEL = functools.partial(mlp, (1, 28, 28), 10)
MODEL_NAME = "mlp(784 -> 128 -> 128 -> 10)"
DATA = functools.partial(bench_core.random_images, n_train=4096, n_test=256)
OBJECT_STORE_BYTES = 256 * 2**20  # per node: the weights are tiny, leave memory to the others


def round_steps(groups: int, tau: int) -> int:
    return 4 * tau if groups == 1 else tau


def train_config(args, groups: int, per_group: int, name: str) -> TrainConfig:
    return TrainConfig(
        num_groups=groups,
        workers_per_group=per_group,
        batch_size=args.batch,
        max_steps=10**9,
        eval_every_s=1e9,
        optimizer=OptimizerConfig(lr=0.01),
        lsgd=LSGDConfig(tau=args.tau, tau_global=4 * args.tau),
        output_dir=os.path.join(args.tmp, name),
        quiet=True,
    )


def placement(trainer: Trainer) -> dict:
    """Where each group's LocalLeader and workers run, against the topology's plan."""
    groups = [
        {
            "group": plan.group,
            "planned_node": plan.node_id,
            "leader_node": info["node_id"],
            "worker_nodes": [w["node_id"] for w in info["workers"]],
        }
        for plan, info in zip(trainer.topology.groups, trainer.group_infos)
    ]
    as_planned = all(g["leader_node"] == g["planned_node"] == w for g in groups for w in g["worker_nodes"])
    distinct = len({g["planned_node"] for g in groups}) == len(groups)
    return {"groups": groups, "as_planned": as_planned, "groups_on_distinct_nodes": distinct}


def measure(trainer: Trainer, args, label: str) -> list[dict]:
    """``args.repeats`` measurements of ``args.rounds`` rounds each, after a warm-up."""
    steps = round_steps(len(trainer.topology.groups), args.tau)
    trainer.run_rounds(max_step=trainer.status()["step"] + args.warmup_rounds * steps)
    samples = []
    for repeat in range(args.repeats):
        before, stats_before = trainer.status(), trainer.worker_stats()
        begin = time.perf_counter()
        after = trainer.run_rounds(max_step=before["step"] + args.rounds * steps)
        driver_s = time.perf_counter() - begin
        stats_after = trainer.worker_stats()
        rounds = after["rounds"] - before["rounds"]
        wall = after["round_wall_s"] - before["round_wall_s"]
        compute = after["round_compute_s"] - before["round_compute_s"]
        worker_compute = [a["compute_s"] - b["compute_s"] for a, b in zip(stats_after, stats_before)]
        sample = {
            "rounds": rounds,
            "steps_per_round": steps,
            "wall_ms_per_round": 1e3 * wall / rounds,
            "compute_ms_per_round": 1e3 * compute / rounds,  # the slowest worker's, summed per round
            "coordination_ms_per_round": 1e3 * (wall - compute) / rounds,
            "worker_compute_mean_ms_per_round": 1e3 * statistics.mean(worker_compute) / rounds,
            "driver_ms_per_round": 1e3 * driver_s / rounds,  # + the driver's call and the final flush
        }
        samples.append(sample)
        print(
            f"  {label} repeat {repeat + 1}/{args.repeats}: {rounds} rounds, "
            f"coordination {sample['coordination_ms_per_round']:.2f} ms/round, "
            f"compute {sample['compute_ms_per_round']:.2f} ms/round",
            flush=True,
        )
    return samples


def summarise(samples: list[dict], workers: int, groups: int, nodes: int) -> dict:
    coordination = [s["coordination_ms_per_round"] for s in samples]
    compute = statistics.median(s["compute_ms_per_round"] for s in samples)
    wall = statistics.median(s["wall_ms_per_round"] for s in samples)
    cost = statistics.median(coordination)
    return {
        "workers": workers,
        "groups": groups,
        "nodes": nodes,
        "coordination_ms_per_round": cost,
        "coordination_ms_min": min(coordination),
        "coordination_ms_max": max(coordination),
        "compute_ms_per_round": compute,
        "wall_ms_per_round": wall,
        "coordination_share": statistics.median(
            s["coordination_ms_per_round"] / s["wall_ms_per_round"] for s in samples
        ),
        "coordination_ms_per_worker": cost / workers,
        "worker_compute_mean_ms_per_round": statistics.median(s["worker_compute_mean_ms_per_round"] for s in samples),
        "samples": samples,
    }


def run_config(args, groups: int, per_group: int, nodes: int, name: str, label: str) -> dict:
    begin = time.perf_counter()
    with Trainer(MODEL, DATA, train_config(args, groups, per_group, name)) as trainer:
        where = placement(trainer)
        print(
            f"{label}: {groups} group(s) x {per_group} worker(s) ready in {time.perf_counter() - begin:.1f}s "
            f"({trainer.weight_bytes:,} bytes of weights); groups on distinct nodes: "
            f"{where['groups_on_distinct_nodes']}, placed as planned: {where['as_planned']}",
            flush=True,
        )
        row = summarise(measure(trainer, args, label), groups * per_group, groups, nodes)
        row["weight_bytes"] = trainer.weight_bytes
    row["placement"] = where
    print(
        f"{label}: coordination {row['coordination_ms_per_round']:.2f} ms/round "
        f"[{row['coordination_ms_min']:.2f}, {row['coordination_ms_max']:.2f}], "
        f"{100 * row['coordination_share']:.1f}% of the round",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------- 1. workers per node


def bench_workers(args, report: dict) -> None:
    ray.init(
        address="local",
        num_cpus=max(16, *args.workers),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        logging_level="WARNING",
    )
    report["workers"] = {"rows": []}
    try:
        for workers in args.workers:
            row = run_config(args, 1, workers, 1, f"workers-{workers}", f"workers W={workers}")
            report["workers"]["rows"].append(row)
            save(report, args.out)
    finally:
        ray.shutdown()
    report["workers"]["growth"] = growth(report["workers"]["rows"], "workers")
    save(report, args.out)


# --------------------------------------------------------------------------- 2. nodes


def bench_nodes(args, report: dict) -> None:
    # Our own head and raylets: Cluster.shutdown() stops only these, never anyone else's Ray.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES},
    )
    report["nodes"] = {"workers_per_node": args.workers_per_node, "rows": []}
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        added = []
        for nodes in args.nodes:
            while len(added) < nodes:  # the cluster grows; its nodes stay for the larger counts
                added.append(cluster.add_node(num_cpus=args.workers_per_node, object_store_memory=OBJECT_STORE_BYTES))
            cluster.wait_for_nodes()
            label = f"nodes N={nodes}"
            row = run_config(args, nodes, args.workers_per_node, nodes, f"nodes-{nodes}", label)
            report["nodes"]["rows"].append(row)
            save(report, args.out)
    finally:
        ray.shutdown()
        cluster.shutdown()
    report["nodes"]["growth"] = growth(report["nodes"]["rows"], "nodes")
    save(report, args.out)


# --------------------------------------------------------------------------- growth, table, plot


def growth(rows: list[dict], key: str) -> dict | None:
    """Exponent k of cost ~ count^k (least squares on log-log): from the medians, and its spread
    over the repeats (the i-th repeat of every count fitted together)."""
    if len({r[key] for r in rows}) < 2:
        return None
    x = np.log([r[key] for r in rows])
    fit = lambda costs: float(np.polyfit(x, np.log(np.maximum(costs, 1e-9)), 1)[0])  # noqa: E731
    exponent = fit([r["coordination_ms_per_round"] for r in rows])
    repeats = min(len(r["samples"]) for r in rows)
    spread = [fit([r["samples"][i]["coordination_ms_per_round"] for r in rows]) for i in range(repeats)]
    first, last = rows[0], rows[-1]
    return {
        "exponent": exponent,
        "exponent_min": min(spread),
        "exponent_max": max(spread),
        "cost_ratio": last["coordination_ms_per_round"] / first["coordination_ms_per_round"],
        "count_ratio": last[key] / first[key],
        "at_most_linear": exponent <= 1.0,
    }


def table(rows: list[dict], key: str) -> str:
    lines = [
        f"| {key} | groups x workers | coordination ms/round, median [min, max] | compute ms/round "
        "| coordination share | coordination ms per worker | groups on distinct nodes |",
        "| ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r[key]} | {r['groups']} x {r['workers'] // r['groups']} "
            f"| {r['coordination_ms_per_round']:.2f} [{r['coordination_ms_min']:.2f}, {r['coordination_ms_max']:.2f}] "
            f"| {r['compute_ms_per_round']:.2f} | {100 * r['coordination_share']:.1f}% "
            f"| {r['coordination_ms_per_worker']:.2f} | {r['placement']['groups_on_distinct_nodes']} |"
        )
    return "\n".join(lines)


def verdict(g: dict | None, what: str) -> str:
    if g is None:
        return f"{what}: one count only, no growth to fit"
    return (
        f"{what}: cost ~ count^{g['exponent']:.2f} (repeats: {g['exponent_min']:.2f}..{g['exponent_max']:.2f}); "
        f"x{g['count_ratio']:g} the count -> x{g['cost_ratio']:.2f} the cost; "
        f"{'no faster than linear' if g['at_most_linear'] else 'FASTER than linear'}"
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    parts = [
        ("workers", "workers (one node, one group)"),
        ("nodes", f"nodes (one group of {report.get('nodes', {}).get('workers_per_node', '?')} workers each)"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, xlabel) in zip(axes, parts):
        rows = report.get(key, {}).get("rows", [])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("coordination per round (ms)")
        if not rows:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            continue
        x = np.array([r[key] for r in rows], dtype=float)
        y = np.array([r["coordination_ms_per_round"] for r in rows])
        low = y - np.array([r["coordination_ms_min"] for r in rows])
        high = np.array([r["coordination_ms_max"] for r in rows]) - y
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4, label="measured (median, min..max)")
        ax.plot(x, y[0] * x / x[0], "k--", linewidth=1, label="linear through the first point")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # labels inside a decade too
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
        g = report[key].get("growth")
        ax.set_title(f"exponent {g['exponent']:.2f}" if g else key)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LSGD coordination cost per synchronous round ({report['model']}, batch {report['batch']})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "workers", "nodes"], default="all")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers-per-node", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tau", type=int, default=4, help="tau_global is 4 tau")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per measurement")
    parser.add_argument("--warmup-rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_scaling.json")
    parser.add_argument("--plot", default="runs/bench_scaling.png")
    parser.add_argument("--tmp", default="runs/bench_scaling_tmp")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from the figures in --out")
    args = parser.parse_args()
    args.workers, args.nodes = sorted(set(args.workers)), sorted(set(args.nodes))
    if args.plot_only:
        with open(args.out) as f:
            plot(json.load(f), args.plot)
        print(f"plot of {args.out} written to {args.plot}")
        return

    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__},
        "model": MODEL_NAME,
        "data": "random 1x28x28 images (4096 train)",
        "batch": args.batch,
        "tau": args.tau,
        "tau_global": 4 * args.tau,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "repeats": args.repeats,
    }
    begin = time.perf_counter()
    if args.part in ("all", "workers"):
        bench_workers(args, report)
    if args.part in ("all", "nodes"):
        bench_nodes(args, report)
    report["total_s"] = time.perf_counter() - begin
    save(report, args.out)
    plot(report, args.plot)

    for key, what in (("workers", "workers per node"), ("nodes", "nodes")):
        if key in report:
            print(f"\n{what} ({report['model']}, batch {args.batch}, tau {args.tau}, tau_G {4 * args.tau}):\n")
            print(table(report[key]["rows"], key))
            print("\n" + verdict(report[key]["growth"], what))
    print(f"\nfigures written to {args.out}, plot to {args.plot} ({report['total_s']:.0f}s in all)")


if __name__ == "__main__":
    main()
