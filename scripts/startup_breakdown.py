"""Where a run's start-up goes: Ray's own start, then each actor from the moment it was asked for
to the moment it was ready, split into waiting for a process, loading its arguments (the imports
they drag in: torch, the dataset's modules) and its ``__init__``.

    .venv/bin/python scripts/startup_breakdown.py                 # the README's main job
    .venv/bin/python scripts/startup_breakdown.py --json out.json
    .venv/bin/python scripts/startup_breakdown.py --nodes 2       # on a 2-node ray.cluster_utils.Cluster

Run it on an idle machine: the phases compete for the same cores. The times come from Ray's own
task events (what ``ray.timeline`` shows), not from the actors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from lsgd_ray import Trainer  # noqa: E402
from lsgd_ray.cli import build_parser, config_from_args  # noqa: E402
from lsgd_ray.data import dataset_factory, dataset_spec  # noqa: E402
from lsgd_ray.models import model_factory  # noqa: E402


def actor_phases(t0: float) -> list[dict]:
    """One row per actor creation task: when it was asked for, when its ``__init__`` began and
    ended (seconds after ``t0``), and how long loading its arguments took in it. Read from Ray's
    task events (a private API: ``ray.timeline`` reads the same)."""
    from ray._private.state import state
    from ray.core.generated import common_pb2

    names, asked, spans, loading = {}, {}, {}, defaultdict(float)
    for event in state._get_all_task_events():
        task = event.task_id
        if event.HasField("task_info") and event.task_info.type == common_pb2.ACTOR_CREATION_TASK:
            names[task] = event.task_info.name.removesuffix(".__init__")
        if event.HasField("state_updates") and event.state_updates.state_ts_ns:
            first = min(event.state_updates.state_ts_ns.values()) / 1e9 - t0
            asked[task] = min(asked.get(task, first), first)
        if event.HasField("profile_events"):
            for e in event.profile_events.events:
                if e.event_name.startswith("task::"):
                    spans[task] = (e.start_time / 1e9 - t0, e.end_time / 1e9 - t0)
                elif e.event_name == "task:deserialize_arguments":
                    loading[task] += (e.end_time - e.start_time) / 1e9
    rows = []
    for task, name in names.items():
        began, ended = spans.get(task, (math.nan, math.nan))
        rows.append(
            {
                "actor": name,
                "asked_s": asked.get(task, math.nan),
                "waited_for_process_s": began - asked.get(task, math.nan),
                "loading_arguments_s": loading[task],
                "init_s": ended - began - loading[task],
                "ready_at_s": ended,
            }
        )
    return sorted(rows, key=lambda r: r["asked_s"])


def complete_phases(t0: float, expected: int, within_s: float = 30.0) -> tuple[list[dict], bool]:
    """``actor_phases`` once exactly the ``expected`` actors have each reported their
    ``__init__`` (task events reach Ray's state in batches, about once a second), and whether
    they had by the deadline."""
    deadline = time.time() + within_s
    while True:
        rows = actor_phases(t0)
        complete = len(rows) == expected and not any(math.isnan(r["ready_at_s"]) for r in rows)
        if complete or time.time() > deadline:
            return rows, complete
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the breakdown here")
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="Ray nodes: 1, a local Ray (the main job); more, a ray.cluster_utils.Cluster of that many "
        "nodes sharing the workers' CPUs (its head has none), one group per node",
    )
    parser.add_argument("train_args", nargs="*", help="`lsgd-ray train` flags after --, e.g. -- --groups 1")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        train = build_parser().parse_args(["train", "--quiet", "--output-dir", tmp, *args.train_args])
        config = config_from_args(train)
        cores = os.cpu_count() or 1
        asked = (config.num_groups or 1) * (config.workers_per_group or 1)  # the local Ray's CPUs
        if args.nodes > 1:  # the topology's default: one group per node, a worker per CPU
            config = dataclasses.replace(config, num_groups=None, workers_per_group=None)
        spec = dataset_spec(train.dataset, train.data_dir, train.image_size)
        model = model_factory(train.model, spec.model_input_shape(train.augment), spec.num_classes)
        data = dataset_factory(train.dataset, train.data_dir, augment=train.augment, image_size=train.image_size)
        t0 = time.time()
        if args.nodes == 1:
            ray.init(address="local", num_cpus=max(cores, asked), include_dashboard=False)
        else:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(args.nodes):  # the workers' CPUs shared out, as the local Ray oversubscribes them
                cluster.add_node(num_cpus=max(1, max(cores, asked) // args.nodes))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
        ray_s = time.time() - t0
        trainer = Trainer(model, data, config)
        try:
            trainer.start()
            total_s = time.time() - t0
            expected = len(trainer.workers) + len(trainer.local_leaders) + 1  # and the coordinator
            rows, all_reported = complete_phases(t0, expected)
            groups = [  # where each group's LocalLeader and workers run, as they said
                {"group": g["group"], "node_id": g["node_id"], "worker_nodes": [w["node_id"] for w in g["workers"]]}
                for g in trainer.group_infos
            ]
        finally:
            trainer.shutdown()
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    workers = len(trainer.workers)
    where = "a local Ray" if cluster is None else f"a {args.nodes}-node Cluster"
    print(f"{train.dataset}, {workers} workers, {cores} cores, {where}; seconds from the start of ray.init")
    start = "ray.init" if cluster is None else "the Cluster and ray.init"
    print(f"{start}: {ray_s:.2f}; every actor ready: {total_s:.2f} (Trainer.start: {trainer.startup_s:.2f})")
    print(f"{'actor':<22}{'asked':>7}{'waited':>8}{'loading':>9}{'init':>7}{'ready':>7}")
    for r in rows:
        print(
            f"{r['actor']:<22}{r['asked_s']:>7.2f}{r['waited_for_process_s']:>8.2f}"
            f"{r['loading_arguments_s']:>9.2f}{r['init_s']:>7.2f}{r['ready_at_s']:>7.2f}"
        )
    print("waited: asked for until its process ran it (Ray starts at most one process per core at once);")
    print("loading: unpickling its arguments and class (imports); init: the rest of __init__")
    if not all_reported:
        print(f"warning: {len(rows)} actors reported, {expected} expected (Ray's task events were late)")
    if args.json:
        report = {
            "command": " ".join([sys.executable, *sys.argv]),
            "nodes": args.nodes,
            "groups": groups,
            "ray_init_s": ray_s,
            "total_s": total_s,
            "all_reported": all_reported,
        }
        with open(args.json, "w") as f:
            json.dump({**report, "startup_s": trainer.startup_s, "actors": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
