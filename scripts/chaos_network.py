"""Faults in the network: a run on the emulated cluster (real namespaces, ``tc``-shaped links)
while one node's link first drops to a crawl and comes back, then goes down altogether and
comes back; the report says how every group trained through each phase.

The phases, timed from the first training step (seconds: ``--calm``, ``--slow``, ``--cut``):

1. ``calm``: every link at ``--link``;
2. ``slow``: the last node's link at ``--slow-link`` (1 Mbit/s), both ways;
3. ``calm``: back to ``--link``;
4. ``cut``: the last node's link down (its switch port), its processes still running;
5. ``after``: the link back up. If the head declares that node dead for its silence (after a
   30 s cut it did so about 27 s after the link was back; its raylet then exits), its Ray node
   is started again, as a rebooted machine joins, and LSGD's dropped group rejoins there.

The run trains in node 0's namespace, in this script (``--inner``), which polls every worker's
step count every second; the report (JSON, and a table on stdout) gives each group's steps per
second in each phase, the run's events with their phase, how it ended, and the test accuracy.

    .venv/bin/python scripts/chaos_network.py --modes async sync  # about 9 minutes; needs root

Needs what the emulated cluster needs (root, iproute2, Ray's ``ray`` command); the cluster is
taken down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lsgd_ray.cluster import EmulatedCluster  # noqa: E402

PHASES = ("calm", "slow", "calm again", "cut", "after")


def phase_plan(args) -> list[tuple[str, float]]:
    """(phase, seconds from the first step when it begins)."""
    lengths = [args.calm, args.slow, args.calm, args.cut, args.after]
    starts, t = [], 0.0
    for name, length in zip(PHASES, lengths):
        starts.append((name, t))
        t += length
    return starts


def phase_at(plan: list[tuple[str, float]], t: float) -> str:
    current = plan[0][0]
    for name, start in plan:
        if t >= start:
            current = name
    return current


def rates(samples: list[dict], plan: list[tuple[str, float]], groups: dict[int, int]) -> dict[str, dict]:
    """Each phase: each group's steps per second (its workers' mean), from the polled counts.
    A worker that did not answer a poll has no sample then; a phase with fewer than two
    samples of a worker gives it no figure."""
    out: dict[str, dict] = {}
    ends = [start for _, start in plan[1:]] + [float("inf")]
    for (name, start), end in zip(plan, ends):
        per_group: dict[int, list[float]] = {}
        for rank, group in groups.items():
            points = [
                (s["t"], s["steps"][str(rank)]) for s in samples if start <= s["t"] < end and str(rank) in s["steps"]
            ]
            if len(points) >= 2 and points[-1][0] > points[0][0]:
                rate = max(points[-1][1] - points[0][1], 0) / (points[-1][0] - points[0][0])
                per_group.setdefault(group, []).append(rate)
            else:
                per_group.setdefault(group, [])
        label = name if name not in out else f"{name} ({start:.0f} s)"
        out[label] = {str(g): (sum(r) / len(r) if r else None) for g, r in sorted(per_group.items())}
    return out


# ---------------------------------------------------------------------- inside node 0


def inner(spec: dict[str, Any]) -> dict[str, Any]:
    """The run, its poller and the faults; returns the report of one mode."""
    import ray

    from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig, Trainer
    from lsgd_ray.data import dataset_factory, dataset_spec
    from lsgd_ray.models import model_factory

    cluster = EmulatedCluster.attach(spec["cluster"])
    victim = cluster.spec.nodes - 1
    plan = [(name, start) for name, start in spec["plan"]]
    total_s = plan[-1][1] + spec["after"]
    ray.init(logging_level="WARNING")
    ds = dataset_spec("digits")
    cfg = TrainConfig(
        algorithm="lsgd",
        lsgd=LSGDConfig(tau=4, tau_global=16, mode=spec["mode"]),
        num_groups=cluster.spec.nodes,
        workers_per_group=cluster.spec.cpus_per_node,
        batch_size=32,
        optimizer=OptimizerConfig(lr=0.05),
        eval_every_s=10.0,
        checkpoint_every_s=10.0,
        actor_timeout_s=spec["actor_timeout"],
        time_budget_s=total_s,
        output_dir=spec["output_dir"],
        quiet=False,
        seed=spec["seed"],
    )
    report: dict[str, Any] = {"mode": spec["mode"], "victim_node": victim, "plan": plan}
    samples: list[dict] = []
    faults: list[dict] = []
    box: dict[str, Any] = {}
    with Trainer(
        model_factory("mlp", ds.model_input_shape(), ds.num_classes), dataset_factory("digits"), cfg
    ) as trainer:
        hosts = {p.group: p.node_id for p in trainer.groups}
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        victim_ip = cluster.spec.address(victim)
        report["victim_groups"] = [g for g, node in hosts.items() if addresses.get(node) == victim_ip]
        groups = {r: p.group for p in trainer.groups for r in p.ranks}
        report["groups"] = {str(r): g for r, g in groups.items()}
        stop = threading.Event()
        t0: list[float] = []  # the first step, on the monotonic clock
        t0_wall: list[float] = []  # and on the wall clock (the run's events carry that)

        def train() -> None:
            try:
                box["result"] = trainer.fit()
            except Exception as exc:
                box["error"], box["traceback"] = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            finally:
                stop.set()

        def poll() -> None:
            pending: dict[int, Any] = {}
            while not stop.wait(1.0):
                ranks = [r for p in trainer.groups for r in p.ranks]  # a dropped group's are gone
                for rank, w in zip(ranks, list(trainer.workers)):
                    if rank not in pending:
                        pending[rank] = w.stats.remote()
                ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.5)
                now, steps = time.monotonic(), {}
                for rank, ref in list(pending.items()):
                    if ref in ready:
                        del pending[rank]
                        with contextlib.suppress(Exception):  # lost with its node: asked again next time
                            steps[str(rank)] = ray.get(ref)["steps"]
                if not t0 and any(v > 0 for v in steps.values()):
                    t0.append(now)
                    t0_wall.append(time.time())
                if t0:
                    samples.append({"t": now - t0[0], "steps": steps})

        def faults_in_order() -> None:
            while not t0 and not stop.wait(0.2):
                pass
            actions = {
                "slow": lambda: cluster.set_link(spec["slow_link"], [victim]),
                "calm again": lambda: cluster.set_link(spec["link"], [victim]),
                "cut": lambda: cluster.cut_link(victim),
                "after": lambda: cluster.cut_link(victim, cut=False),
            }
            for name, start in plan[1:]:
                if stop.wait(max(t0[0] + start - time.monotonic(), 0)):
                    return
                actions[name]()
                faults.append({"phase": name, "t": time.monotonic() - t0[0]})
                print(f"chaos_network: {name} at {faults[-1]['t']:.0f} s", flush=True)
            # the head may declare the node dead for its silence while cut off, even some time
            # after the link is back (its health checks count the failures): it is then started
            # again, once, as a rebooted machine would join
            ip = cluster.spec.address(victim)
            while not stop.wait(2.0):
                if not any(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes()):
                    faults.append({"phase": "node declared dead", "t": time.monotonic() - t0[0]})
                    print(f"chaos_network: node {victim} declared dead at {faults[-1]['t']:.0f} s; "
                          "its Ray node starts again", flush=True)  # fmt: skip
                    cluster.restart_node(victim)
                    faults.append({"phase": "node restarted", "t": time.monotonic() - t0[0]})
                    print(f"chaos_network: node {victim} back at {faults[-1]['t']:.0f} s", flush=True)
                    return

        threads = [threading.Thread(target=f, daemon=True) for f in (train, poll, faults_in_order)]
        for t in threads:
            t.start()
        threads[0].join()
        stop.set()
        for t in threads[1:]:
            t.join(timeout=180)
        result = box.get("result")
        if result is not None:
            report.update(status=result.status, error=result.error, final_test_accuracy=result.final_test_accuracy,
                          steps_per_worker=result.steps_per_worker)  # fmt: skip
            begin = t0_wall[0] if t0_wall else time.time()
            report["events"] = [
                {**{k: e.get(k) for k in ("event", "group", "rank", "reason")}, "t": e["time"] - begin,
                 "phase": phase_at(plan, e["time"] - begin)}
                for e in result.events
            ]  # fmt: skip
        else:
            report.update(status="aborted", error=box.get("error"), traceback=box.get("traceback"))
    ray.shutdown()
    report["faults"] = faults
    report["samples"] = samples
    report["rates"] = rates(samples, plan, groups)
    return report


# ---------------------------------------------------------------------- outside


def table(report: dict) -> str:
    lines = []
    for run in report["runs"]:
        victims = set(map(str, run.get("victim_groups", [])))
        lines.append(f"\n{run['mode']} LSGD: {run['status']}, test accuracy {run.get('final_test_accuracy')}, "
                     f"cut node's group(s) {sorted(victims)}")  # fmt: skip
        groups = sorted({g for r in run["rates"].values() for g in r}, key=int)
        lines.append(
            "| phase | " + " | ".join(f"group {g}{' (cut node)' if g in victims else ''}" for g in groups) + " |"
        )
        lines.append("| --- |" + " ---: |" * len(groups))
        for phase, per_group in run["rates"].items():
            cells = ["-" if per_group.get(g) is None else f"{per_group[g]:.1f}" for g in groups]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        events = [f"{e['event']} (group {e.get('group')}, {e['phase']})" for e in run.get("events", [])]
        lines.append("events: " + (", ".join(events) or "none"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", default=["async", "sync"], choices=["async", "sync"])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--cpus-per-node", type=int, default=1, help="workers per group (one group per node)")
    p.add_argument("--link", default="100mbit")
    p.add_argument("--slow-link", default="1mbit")
    p.add_argument("--calm", type=float, default=15.0, help="seconds")
    p.add_argument("--slow", type=float, default=30.0, help="seconds")
    p.add_argument("--cut", type=float, default=30.0, help="seconds")
    p.add_argument("--after", type=float, default=90.0, help="seconds")
    p.add_argument("--actor-timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="lsgdnet", help="the emulated cluster's name")
    p.add_argument("--out", default="runs/chaos_network.json")
    p.add_argument("--tmp", default="runs/chaos_network_tmp")
    args = p.parse_args()
    if args.inner:
        with open(args.inner) as f:
            spec = json.load(f)
        out = inner(spec)
        with open(spec["report"], "w") as f:
            json.dump(out, f, indent=1, default=str)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    os.makedirs(args.tmp, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "runs": []}
    plan = phase_plan(args)
    for mode in args.modes:
        print(f"chaos_network: {mode} LSGD on {args.nodes} nodes at {args.link}; the last node's link "
              f"{args.slow_link} at {plan[1][1]:.0f} s, cut at {plan[3][1]:.0f} s, back at {plan[4][1]:.0f} s",
              flush=True)  # fmt: skip
        tmp = os.path.abspath(os.path.join(args.tmp, mode))
        os.makedirs(tmp, exist_ok=True)
        spec = {
            "cluster": args.name, "mode": mode, "plan": plan, "after": args.after, "link": args.link,
            "slow_link": args.slow_link, "actor_timeout": args.actor_timeout, "seed": args.seed,
            "output_dir": os.path.join(tmp, "run"), "report": os.path.join(tmp, "report.json"),
        }  # fmt: skip
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        limit = plan[-1][1] + args.after + 600
        with EmulatedCluster(args.nodes, args.cpus_per_node, args.link, name=args.name, object_store_mb=256) as cluster:
            done = cluster.run([sys.executable, os.path.abspath(__file__), "--inner", os.path.join(tmp, "spec.json")],
                               timeout=limit, cwd=ROOT)  # fmt: skip
        if done.returncode != 0 or not os.path.exists(spec["report"]):
            run = {"mode": mode, "status": "aborted", "error": f"the run's process exited with {done.returncode}",
                   "rates": {}}  # fmt: skip
        else:
            with open(spec["report"]) as f:
                run = json.load(f)
        report["runs"].append(run)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)
    print(table(report))


if __name__ == "__main__":
    main()
