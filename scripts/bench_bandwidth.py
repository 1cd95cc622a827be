"""Time to accuracy against link speed, every contender on an emulated cluster with shaped links.

Each layout (``2x2``: 2 nodes x 2 workers, ``2x1``: 2 nodes x 1 worker) runs on an emulated
cluster (``lsgd_ray.cluster``: one network namespace and Ray node per node, links shaped with
``tc tbf`` both ways) at each link rate; every contender runs as its own driver in node 0, so
what crosses between the nodes pays the link and nothing else does. Fashion-MNIST (``--data-dir``,
else the bundled digits with a note), CNN7, batch 128 per worker, Nesterov SGD (momentum 0.9,
weight decay 1e-4) for every contender; evaluation every ``--eval-every`` training seconds, off
the clock, each contender stopping at the first evaluation at or above ``--target``.

Contenders: ``lsgd`` and ``lsgd_async`` (one run each gives the time of the center, which stops
the run as in the reference code, and of the leader: the first evaluation where it was at the
target, if before the center's), ``lsgd_reference`` (the authors' LSGD: ``reference-lsgd``'s
proximal pull and shards re-dealt every epoch), ``easgd``, ``local_sgd`` (hierarchical),
``diloco`` (hierarchical: group averages every P/4, the outer step every P), ``data_parallel``
(ours), ``ray_train_ddp`` (Ray Train v2 TorchTrainer, DDP over gloo), ``ray_train_powersgd``
(the same with torch's PowerSGD communication hook, rank 2) and ``plain`` (one process on the
whole data with min(W, cores) threads: a reference line that uses no link).

Measured per run: training seconds to the target, samples to the target, samples/s, wall
seconds of the whole driver, bytes each node sent and received on its link (the kernel's
counters) and so link bytes per worker-step. ``--tune`` first picks each contender's learning
rate from {0.1, 0.05, 0.02} and, for the periodic ones, its period (what crosses the link every
P steps: LSGD's and local SGD's τ_G, EASGD's τ; their in-node τ = P/4) from {4, 16, 64}, on a
seed kept out of the comparison, at ``--tune-rate``; later runs use the chosen settings. The
search is by coordinates (the rates at P = 16, then the periods at the best rate: 5 runs, not 9),
and a tuning run stops one evaluation interval after the fastest time to the target its
contender has shown so far (it cannot win after that): about 52 runs, a few hours.

Every run is appended to ``--out`` as soon as it ends; a run already there (same layout, rate,
contender, seed, lr and period) is not run again, so a sweep goes on in pieces across sessions.

    .venv/bin/python scripts/bench_bandwidth.py --data-dir ../shared/data --tune            # tuning only
    .venv/bin/python scripts/bench_bandwidth.py --data-dir ../shared/data --seeds 0 1 2      # the sweep
    .venv/bin/python scripts/bench_bandwidth.py --report                                     # table + plot

Needs root (network namespaces); see ``lsgd-ray cluster --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lsgd_ray.cluster import EmulatedCluster, format_rate, parse_rate  # noqa: E402

CONTENDERS = [
    "lsgd", "lsgd_async", "lsgd_reference", "lsgd_bf16", "easgd", "local_sgd", "diloco", "diloco_flat",
    "diloco_streaming", "data_parallel", "data_parallel_powersgd", "ray_train_ddp", "ray_train_powersgd", "plain",
]  # fmt: skip
PERIODIC = {
    "lsgd", "lsgd_async", "lsgd_reference", "lsgd_bf16", "easgd", "local_sgd", "diloco", "diloco_flat",
    "diloco_streaming",
}  # fmt: skip
STREAMING_FRAGMENTS = 4  # diloco_streaming: one quarter of the weights crosses every P/4 steps
# contender -> its algorithm, where the name is not the algorithm's
ALGORITHM_OF = {
    "lsgd_async": "lsgd", "lsgd_reference": "lsgd", "lsgd_bf16": "lsgd", "diloco_flat": "diloco",
    "diloco_streaming": "diloco", "data_parallel_powersgd": "data_parallel",
}  # fmt: skip
# variants that run on another contender's tuned settings: one that only changes the wire format,
# and asynchronous LSGD (the same λ, τ and lr; tuned on its own it would cost 5 more runs of the
# six hours the sweep may take: see docs/benchmarks-bandwidth.md, "The sweep's cells")
TUNED_AS = {"lsgd_bf16": "lsgd", "lsgd_async": "lsgd"}
LAYOUT_RATES = {"2x2": ["none", "1gbit", "100mbit", "30mbit"], "2x1": ["none", "100mbit"]}
LR_GRID = [0.1, 0.05, 0.02]
PERIOD_GRID = [4, 16, 64]
DEFAULT_LR, DEFAULT_PERIOD = 0.05, 16
RUN_KEYS = ("layout", "rate", "contender", "seed", "lr", "period")


# --------------------------------------------------------------------------- one run, in node 0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one contender as a driver joined to the emulated cluster; returns its row."""
    import ray

    from lsgd_ray import OptimizerConfig, fit
    from lsgd_ray.baselines import Budget, plain_loop, ray_train_ddp
    from lsgd_ray.data import dataset_factory, dataset_spec
    from lsgd_ray.models import model_factory

    name, nodes, per_node = spec["contender"], spec["nodes"], spec["per_node"]
    workers = nodes * per_node
    data = "fashion-mnist" if spec["data_dir"] else "digits"
    ds = dataset_spec(data)
    model_fn = model_factory(spec["model"], ds.model_input_shape(), ds.num_classes)
    data_fn = dataset_factory(data, spec["data_dir"])
    opt = OptimizerConfig(lr=spec["lr"])
    common = {
        "time_budget_s": spec["time_budget"],
        "eval_every_s": spec["eval_every"],
        "target_accuracy": spec["target"],
    }
    begin = time.perf_counter()
    if name == "plain":
        r = plain_loop(model_fn, data_fn, batch_size=spec["batch"], optimizer=opt, budget=Budget(**common),
                       seed=spec["seed"], threads=min(workers, os.cpu_count() or 1))  # fmt: skip
        history, startup, samples, train_s, steps = r.history, 0.0, r.samples, r.train_s, r.steps * workers
    elif name.startswith("ray_train"):
        ray.init(logging_level="WARNING")
        r = ray_train_ddp(
            model_fn, data_fn, num_workers=workers, batch_size=spec["batch"], optimizer=opt, budget=Budget(**common),
            seed=spec["seed"], storage_path=spec["tmp"], name=spec["tag"],
            comm_hook="powersgd" if name.endswith("powersgd") else None,
        )  # fmt: skip
        history, startup, samples, train_s, steps = r.history, r.startup_s, r.samples, r.train_s, r.steps * workers
    else:
        cfg = contender_config(spec, output_dir=os.path.join(spec["tmp"], spec["tag"]), address="auto", **common)
        r = fit(model_fn, data_fn, cfg)
        history, startup, samples, train_s = r.history, r.timings["startup_s"], r.samples, r.timings["train_s"]
        steps = samples // spec["batch"]
    wall = time.perf_counter() - begin
    target = spec["target"]
    row = {
        "time_to_target_s": _first(history, "test_accuracy", target, "train_s"),
        "samples_to_target": _first(history, "test_accuracy", target, "samples"),
        "wall_s": wall,
        "startup_s": startup,
        "train_s": train_s,
        "samples": samples,
        "worker_steps": steps,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "history": [{k: v for k, v in h.items() if isinstance(v, int | float) or v is None} for h in history],
    }
    if name.startswith("lsgd"):  # the run stops on the center; the leader's time if it got there first
        row["leader_time_to_target_s"] = _first(history, "leader_test_accuracy", target, "train_s")
        row["center_time_to_target_s"] = _first(history, "center_test_accuracy", target, "train_s")
    return row


def contender_config(spec: dict[str, Any], **run: Any) -> Any:
    """The TrainConfig of a contender run by ``fit`` (everything but the baselines): the sweep's
    lr and period P (what crosses the link every P steps; in-node periods P/4)."""
    from lsgd_ray import (
        DataParallelConfig,
        DiLoCoConfig,
        EASGDConfig,
        LocalSGDConfig,
        LSGDConfig,
        OptimizerConfig,
        TrainConfig,
    )
    from lsgd_ray.presets import PRESETS

    name, period = spec["contender"], spec["period"]
    inner = max(1, period // 4)
    lsgd = {"tau": inner, "tau_global": period, "evaluate": "center"}
    lsgd["mode"] = "async" if name == "lsgd_async" else "sync"
    redeal = False
    if name == "lsgd_reference":  # its pulls, proximal pull and sampler; the sweep's periods and lr
        lsgd = {**PRESETS["reference-lsgd"].settings["lsgd"], "tau": inner, "tau_global": period}
        redeal = True
    # DiLoCo: hierarchical (group averages every P/4, the outer step every P); flat (only the
    # outer step); streaming (flat, one of 4 fragments every P/4 steps)
    hierarchical = name == "diloco" and inner < period
    fragments = STREAMING_FRAGMENTS if name == "diloco_streaming" else 1
    compression = "powersgd" if name == "data_parallel_powersgd" else "none"
    return TrainConfig(
        algorithm=ALGORITHM_OF.get(name, name),
        lsgd=LSGDConfig(**lsgd),
        easgd=EASGDConfig(tau=period),
        local_sgd=LocalSGDConfig(tau=inner, tau_global=period),
        diloco=DiLoCoConfig(tau=inner if hierarchical else None, tau_global=period, fragments=fragments),
        data_parallel=DataParallelConfig(compression=compression),
        comm_dtype="bfloat16" if name == "lsgd_bf16" else "float32",
        optimizer=OptimizerConfig(lr=spec["lr"]),
        num_groups=spec["nodes"],
        workers_per_group=spec["per_node"],
        batch_size=spec["batch"],
        seed=spec["seed"],
        redeal_shards=redeal,
        quiet=True,
        **run,
    )


def _first(history: list[dict], key: str, target: float | None, what: str) -> float | None:
    if target is None:
        return None
    return next((h[what] for h in history if h.get(key) is not None and h[key] >= target), None)


# --------------------------------------------------------------------------- the sweep, in our namespace


def run_in_cluster(cluster: EmulatedCluster, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    before = cluster.link_bytes()
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        done = cluster.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:.0f} s"}
    after = cluster.link_bytes()
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    row = json.loads(lines[-1])
    moved = [{"tx": a["tx"] - b["tx"], "rx": a["rx"] - b["rx"]} for a, b in zip(after, before)]
    row["link_bytes"] = moved
    sent = sum(m["tx"] for m in moved)
    row["link_bytes_per_worker_step"] = sent / row["worker_steps"] if row.get("worker_steps") else None
    return row


def chosen_settings(report: dict, contender: str) -> tuple[float, int, bool]:
    """(lr, period, tuned) for a contender: the tuning's choice, else the defaults."""
    pick = report.get("tuning", {}).get("chosen", {}).get(TUNED_AS.get(contender, contender))
    if pick:
        return pick["lr"], pick["period"], True
    return DEFAULT_LR, DEFAULT_PERIOD, False


def done_keys(report: dict) -> set[tuple]:
    return {tuple(r[k] for k in RUN_KEYS) for r in report["runs"] if "error" not in r}


def plan(args, report: dict) -> list[dict[str, Any]]:
    """The runs still to do, grouped by (layout, rate) so each cluster comes up once."""
    todo, have = [], done_keys(report)
    if args.tune:
        for name in args.contenders:
            if name == "plain" or name in TUNED_AS:
                continue
            for lr, period in tuning_grid(report, name):
                todo.append({"layout": "2x2", "rate": args.tune_rate, "contender": name, "seed": args.tune_seed,
                             "lr": lr, "period": period, "tuning": True})  # fmt: skip
    else:
        for layout in args.layouts:
            for rate in args.rates or LAYOUT_RATES[layout]:
                for seed in args.seeds:
                    for name in args.contenders:
                        if name == "plain" and parse_rate(rate) is not None:
                            continue  # uses no link: measured once per layout, unshaped
                        lr, period, tuned = chosen_settings(report, name)
                        todo.append({"layout": layout, "rate": rate, "contender": name, "seed": seed, "lr": lr,
                                     "period": period, "tuned": tuned})  # fmt: skip
    return [t for t in todo if tuple(t[k] for k in RUN_KEYS) not in have]


def tuning_grid(report: dict, contender: str) -> list[tuple[float, int]]:
    """A coordinate search over {0.1, 0.05, 0.02} x {4, 16, 64}: the learning rates at the default
    period (the default lr first: its time bounds the others, see ``tuning_budget``), then, once
    those are measured, the periods at the best of them: 5 runs instead of 9 for a periodic
    contender, 3 for the others."""
    rates = sorted(LR_GRID, key=lambda lr: lr != DEFAULT_LR)
    grid = [(lr, DEFAULT_PERIOD) for lr in rates]
    measured = [r for r in tuning_runs(report, contender) if r["period"] == DEFAULT_PERIOD]
    if contender in PERIODIC and {r["lr"] for r in measured} >= set(LR_GRID):
        best = fastest(measured)["lr"]
        grid += [(best, period) for period in PERIOD_GRID if period != DEFAULT_PERIOD]
    return grid


def tuning_runs(report: dict, contender: str) -> list[dict]:
    return [r for r in report["runs"] if r.get("tuning") and r["contender"] == contender and "error" not in r]


def fastest(runs: list[dict]) -> dict:
    """The run that reached the target first; if none did, the one that ended most accurate."""
    return min(
        runs,
        key=lambda r: (r["time_to_target_s"] is None, r["time_to_target_s"] or 0, -(r["final_test_accuracy"] or 0)),
    )


def tuning_budget(report: dict, contender: str, args) -> float:
    """A tuning run only has to tell whether it beats the fastest setting tried so far, so it
    stops one evaluation interval after that setting's time to the target: the choice is the same
    as with the full budget, at a fraction of the machine time (the defaults, run first, set the
    first bound)."""
    times = [r["time_to_target_s"] for r in tuning_runs(report, contender) if r["time_to_target_s"] is not None]
    return min([args.time_budget] + [t + args.eval_every for t in times])


def sweep(args, report: dict) -> None:
    """Runs what ``plan`` says is left, one emulated cluster per (layout, rate), planning again
    after every run (the tuning's second stage depends on its first); a run that failed is not
    tried again in this call."""
    failed: set[tuple] = set()

    def left() -> list[dict[str, Any]]:
        return [t for t in plan(args, report) if tuple(t[k] for k in RUN_KEYS) not in failed]

    print(f"bench_bandwidth: {len(left())} run(s) to do" + (" (more once the first stage is in)" if args.tune else ""),
          flush=True)  # fmt: skip
    while todo := left():
        layout, rate = todo[0]["layout"], todo[0]["rate"]
        nodes, per_node = (int(x) for x in layout.split("x"))
        with EmulatedCluster(nodes, per_node, rate, name=args.cluster_name, object_store_mb=512) as cluster:
            while here := [t for t in left() if (t["layout"], t["rate"]) == (layout, rate)]:
                t = here[0]
                tag = f"{layout}-{rate}-{t['contender']}-s{t['seed']}-lr{t['lr']}-p{t['period']}-{time.strftime('%H%M%S')}"
                spec = {
                    **t, "nodes": nodes, "per_node": per_node, "data_dir": args.data_dir, "model": args.model,
                    "batch": args.batch, "target": args.target,
                    "time_budget": tuning_budget(report, t["contender"], args) if t.get("tuning") else args.time_budget,
                    "eval_every": args.eval_every, "tmp": os.path.abspath(args.tmp), "tag": tag,
                }  # fmt: skip
                row = {
                    **t,
                    "time_budget_s": spec["time_budget"],
                    **run_in_cluster(cluster, spec, args.time_budget * 3 + 300),
                }
                if "error" in row:
                    failed.add(tuple(t[k] for k in RUN_KEYS))
                report["runs"].append(row)
                report["summary"] = summarize(report)
                save(report, args.out)
                print(progress_line(row, args.target), flush=True)
    if args.tune:
        report.setdefault("tuning", {})["chosen"] = choose(report, args)
        save(report, args.out)
        print("tuning chose: " + json.dumps(report["tuning"]["chosen"]), flush=True)


def progress_line(row: dict, target: float) -> str:
    head = (
        f"{row['layout']} {row['rate']:>7} {row['contender']:>18} seed {row['seed']} lr {row['lr']} P {row['period']}"
    )
    if "error" in row:
        return f"{head}: FAILED {row['error']}"
    tta = row["time_to_target_s"]
    reached = "not reached" if tta is None else f"{tta:6.1f} s"
    per_step = row["link_bytes_per_worker_step"]
    return (
        f"{head}: to {target:.0%} {reached}  wall {row['wall_s']:6.1f} s  {row['samples_per_s']:7.0f} samples/s  "
        f"link {0 if per_step is None else per_step / 1e3:8.1f} kB/worker-step  final {row['final_test_accuracy']:.4f}"
    )


def choose(report: dict, args) -> dict[str, dict]:
    """Per contender, the (lr, period) of its fastest tuning run, so the comparison runs on each
    contender's best settings."""
    chosen = {}
    for name in sorted({r["contender"] for r in report["runs"] if r.get("tuning") and "error" not in r}):
        best = fastest(tuning_runs(report, name))
        chosen[name] = {"lr": best["lr"], "period": best["period"], "time_to_target_s": best["time_to_target_s"]}
    return chosen


# --------------------------------------------------------------------------- summary, table, plot


def spread(values: list[float]) -> dict | None:
    return (
        {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
        if values
        else None
    )


def censored_spread(reached: list[float], not_reached: list[float]) -> dict | None:
    """Median, min and max over runs, counting a run that never reached the target as slower than
    how far it went (``not_reached``: its training seconds, or samples): a censored median. None
    when there are no runs. With ``censored`` set the median is only a lower bound: the middle of
    the sorted runs falls on (or may be overtaken by) a run that did not reach. ``min`` and
    ``max`` are over the runs that reached (None when none did); ``n`` counts those runs."""
    runs = sorted([(v, False) for v in reached] + [(b, True) for b in not_reached])
    if not runs:
        return None
    middle = runs[(len(runs) - 1) // 2 : len(runs) // 2 + 1]
    top = middle[-1][0]
    censored = any(c for _, c in middle) or any(c and b < top for b, c in runs)
    return {
        "median": statistics.median(v for v, _ in runs),
        "censored": censored,
        "min": min(reached, default=None),
        "max": max(reached, default=None),
        "n": len(reached),
    }


def within(ours: dict | None, theirs: dict | None, bound: float, strict: bool = False) -> bool | None:
    """Whether ours / theirs (two censored medians) is at most ``bound`` (below it with ``strict``):
    None where a side is missing or the censoring leaves it open (a censored median is a lower
    bound, so a censored ``theirs`` can only make the ratio smaller, a censored ``ours`` larger)."""
    if not ours or not theirs or (ours["censored"] and theirs["censored"]):
        return None
    r = ours["median"] / theirs["median"]
    ok = r < bound if strict else r <= bound
    if theirs["censored"]:
        return True if ok else None
    if ours["censored"]:
        return False if not ok else None
    return ok


def ratio_text(ours: dict | None, theirs: dict | None) -> str:
    """ours / theirs, with "<=" or ">=" where a censored median makes it a bound."""
    if not ours or not theirs or (ours["censored"] and theirs["censored"]):
        return "-"
    sign = "<= " if theirs["censored"] else ">= " if ours["censored"] else ""
    return f"{sign}{ours['median'] / theirs['median']:.2f}"


def contender_rows(report: dict) -> dict[str, dict[str, dict[str, list[dict]]]]:
    """layout -> rate -> contender (LSGD split into its center and leader) -> comparison runs."""
    cells: dict = {}
    for r in report["runs"]:
        if r.get("tuning") or "error" in r:
            continue
        names = [r["contender"]]
        if r["contender"].startswith("lsgd"):
            names = [f"{r['contender']} (center)", f"{r['contender']} (leader)"]
        for name in names:
            cells.setdefault(r["layout"], {}).setdefault(r["rate"], {}).setdefault(name, []).append(r)
    return cells


def time_of(run: dict, name: str) -> float | None:
    if name.endswith("(leader)"):
        return run.get("leader_time_to_target_s")
    if name.endswith("(center)"):
        return run.get("center_time_to_target_s", run["time_to_target_s"])
    return run["time_to_target_s"]


def summarize(report: dict) -> dict:
    summary: dict = {}
    for layout, rates in contender_rows(report).items():
        plain = rates.get("none", {}).get("plain", [])
        for rate, cells in rates.items():
            out = summary.setdefault(layout, {}).setdefault(rate, {})
            for name, runs in {**cells, **({"plain": plain} if plain else {})}.items():
                times = [t for t in (time_of(r, name) for r in runs) if t is not None]
                missed = [r for r in runs if time_of(r, name) is None]
                out[name] = {
                    "time_to_target_s": censored_spread(times, [r["train_s"] for r in missed]),
                    "reached": len(times),
                    "runs": len(runs),
                    "wall_s": spread([r["wall_s"] for r in runs]),
                    "samples_per_s": spread([r["samples_per_s"] for r in runs]),
                    # a run's samples to target are its evaluated model's (LSGD: the center's), not the leader's
                    "samples_to_target": None
                    if name.endswith("(leader)")
                    else censored_spread(
                        [r["samples_to_target"] for r in runs if r.get("samples_to_target")],
                        [r["samples"] for r in runs if not r.get("samples_to_target")],
                    ),
                    "link_bytes_per_worker_step": spread(
                        [
                            r["link_bytes_per_worker_step"]
                            for r in runs
                            if r.get("link_bytes_per_worker_step") is not None
                        ]
                    ),
                }
    return summary


def fmt(s: dict | None) -> str:
    """A censored time spread: its median (">= m" when only a lower bound) and the reaching runs' range."""
    if s is None:
        return "-"
    median = f">= {s['median']:.1f} s" if s["censored"] else f"{s['median']:.1f} s"
    return median + (f" ({s['min']:.1f}-{s['max']:.1f}, n={s['n']})" if s["n"] else " (none reached)")


# The goals on 2 x 2 (#14): LSGD's time to the target at most this multiple of Ray Train
# DDP's, per rate; at the shaped rates also below every other contender's.
GOALS = {"100mbit": 0.5, "30mbit": 0.3, "none": 1.25}
# The LSGD a goal and a ratio speak for: as its authors run it (center evaluated, proximal pull,
# shards re-dealt) when the report has it, else ours.
HEADLINE_LSGD = ("lsgd_reference (center)", "lsgd (center)")


def headline_lsgd(cells: dict) -> tuple[str, dict | None]:
    """The LSGD row a rate's ratios are taken against, and its time to target (None if it never
    got there)."""
    for name in HEADLINE_LSGD:
        if name in cells:
            return name, cells[name]["time_to_target_s"]
    return HEADLINE_LSGD[0], None


def goals(report: dict, layout: str = "2x2") -> list[dict]:
    """Per rate with a goal: LSGD's median time to target over Ray Train DDP's against the goal,
    and over every contender that is not an LSGD (below each of them at the shaped rates). The
    medians are censored (a run that never reached the target counts as slower than how long it
    trained), so a ratio may be only a bound: ``met`` is None ("not decided") where that bound, or
    a missing side, leaves the goal open."""
    rows = []
    for rate, bound in GOALS.items():
        cells = report.get("summary", {}).get(layout, {}).get(rate)
        if not cells:
            continue
        name, ours = headline_lsgd(cells)
        ddp = (cells.get("ray_train_ddp") or {}).get("time_to_target_s")
        others = {n: c["time_to_target_s"] for n, c in cells.items() if not n.startswith("lsgd") and n != "plain"}
        others = {n: t for n, t in others.items() if t}
        fastest = min(others, key=lambda n: others[n]["median"]) if others else None
        decisions = [within(ours, ddp, bound)]
        if rate != "none":
            decisions += [within(ours, t, 1.0, strict=True) for t in others.values()]
        met = False if False in decisions else None if None in decisions else True  # a three-valued "and"
        rows.append({"rate": rate, "lsgd": name, "lsgd_s": ours and ours["median"],
                     "over_ddp": ratio_text(ours, ddp), "bound": bound, "fastest_other": fastest,
                     "over_fastest": ratio_text(ours, others.get(fastest or "")), "met": met})  # fmt: skip
    return rows


def goals_table(rows: list[dict]) -> str:
    lines = [
        "\n2x2 goals (#14): LSGD's median time to target over Ray Train DDP's, and over the fastest other contender\n",
        "| rate | LSGD | over Ray Train DDP | goal | fastest other contender | LSGD over it | met |",
        "| --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for g in rows:
        below = "" if g["rate"] == "none" else " and < 1"
        met = {True: "yes", False: "no", None: "not decided"}[g["met"]]
        lines.append(
            f"| {g['rate']} | {g['lsgd']} | {g['over_ddp']} | <= {g['bound']}{below} | "
            f"{g['fastest_other'] or '-'} | {g['over_fastest']} | {met} |"
        )
    return "\n".join(lines)


def table(report: dict) -> str:
    target = report["settings"]["target"]
    lines = []
    for layout, rates in report["summary"].items():
        lines += [
            f"\n{layout}: time to {target:.0%}, median (min-max, seeds reached); link kB per worker-step\n",
            "| rate | contender | time to target | reached | samples to target | samples/s | link kB/worker-step "
            "| LSGD over it |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for rate in sorted(rates, key=lambda r: -(parse_rate(r) or 1e12)):
            cells = rates[rate]
            _, ours = headline_lsgd(cells)
            for name, cell in sorted(cells.items()):
                t, per_step = cell["time_to_target_s"], cell["link_bytes_per_worker_step"]
                ratio = ratio_text(ours, t)
                rate_cell = cell["samples_per_s"]["median"] if cell["samples_per_s"] else 0
                link = "-" if per_step is None else f"{per_step['median'] / 1e3:.1f}"
                samples = cell["samples_to_target"]
                to_target = "-" if samples is None else f"{'>= ' * samples['censored']}{samples['median']:,.0f}"
                lines.append(
                    f"| {rate} | {name} | {fmt(t)} | {cell['reached']}/{cell['runs']} | {to_target} | {rate_cell:,.0f} "
                    f"| {link} | {ratio} |"
                )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(report["summary"])
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 4.5), squeeze=False)
    unshaped = 10e9  # where "none" sits on the axis
    # one style per contender in every panel: the authors' LSGD black, DDP red, the plain process
    # grey; the others tab10's remaining colours, then the same colours with square markers
    fixed = {"lsgd_reference (center)": "black", "lsgd_reference (leader)": "dimgrey", "ray_train_ddp": "tab:red",
             "plain": "tab:gray"}  # fmt: skip
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    every = sorted({n for rates in report["summary"].values() for cells in rates.values() for n in cells} - set(fixed))
    style = {name: (color, "o") for name, color in fixed.items()}
    style |= {name: (palette[i % len(palette)], "os"[i // len(palette) % 2]) for i, name in enumerate(every)}
    for ax, layout in zip(axes[0], layouts):
        rates = report["summary"][layout]
        names = sorted({n for cells in rates.values() for n in cells})
        for name in names:
            points = sorted(
                (parse_rate(rate) or unshaped, cells[name]["time_to_target_s"])
                for rate, cells in rates.items()
                if name in cells and (cells[name]["time_to_target_s"] or {}).get("n")  # no run reached: no point
            )
            if not points:
                continue
            xs = [p[0] for p in points]
            # the reaching runs' range; a censored median (a lower bound) gets an upward triangle
            low = [max(p[1]["median"] - p[1]["min"], 0) for p in points]
            high = [max(p[1]["max"] - p[1]["median"], 0) for p in points]
            line = ax.errorbar(
                xs, [p[1]["median"] for p in points], yerr=[low, high],
                marker=style[name][1], capsize=3, label=name, linestyle="--" if name == "plain" else "-",
                color=style[name][0], linewidth=2.5 if name == "lsgd_reference (center)" else 1.5,
                zorder=1.5 if name == "lsgd_reference (center)" else 2,  # a contender level with it shows on top
            )  # fmt: skip
            bounds = [p for p in points if p[1]["censored"]]
            if bounds:
                ax.plot([p[0] for p in bounds], [p[1]["median"] for p in bounds], "^", ms=10,
                        color=line[0].get_color(), mfc="none")  # fmt: skip
        ax.set_xscale("log")
        ticks = sorted({parse_rate(r) or unshaped for r in rates})
        ax.set_xticks(ticks, [format_rate(t) if t != unshaped else "none" for t in ticks])
        ax.set_xlabel("link rate between the two nodes (both ways)")
        ax.set_ylabel(f"training seconds to {report['settings']['target']:.0%} test accuracy")
        ax.set_title(f"{layout} (nodes x workers), Fashion-MNIST CNN7")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="open triangle: a lower bound (runs missed the target)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", flush=True)


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST (torchvision raw layout); default: digits")
    p.add_argument("--model", default="cnn7")
    p.add_argument("--layouts", nargs="+", default=["2x2", "2x1"], choices=sorted(LAYOUT_RATES))
    p.add_argument("--rates", nargs="+", default=None, help="default per layout: " + json.dumps(LAYOUT_RATES))
    p.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=128, help="per worker")
    p.add_argument("--target", type=float, default=0.88)
    p.add_argument("--time-budget", type=float, default=300.0, help="training seconds per run at most")
    p.add_argument("--eval-every", type=float, default=5.0, help="training seconds between evaluations")
    p.add_argument("--tune", action="store_true", help="run the lr/period grid on --tune-seed, then choose")
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--tune-rate", default="100mbit")
    p.add_argument("--report", action="store_true", help="no runs: the table, goals and plot from --out")
    p.add_argument("--out", default="runs/bench_bandwidth.json")
    p.add_argument("--plot", default=None, help="default: --out with .png")
    p.add_argument("--tmp", default="runs/bench_bandwidth_tmp")
    p.add_argument("--cluster-name", default="bw", help="the emulated cluster's name (its namespaces: NAME-n0...)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    elif not args.report:
        print("note: no --data-dir: the bundled digits (1x8x8) and the small CNN, not Fashion-MNIST", flush=True)
        args.model = "cnn" if args.model == "cnn7" else args.model
    settings = {"data": "fashion-mnist" if args.data_dir else "digits", "model": args.model, "batch": args.batch,
                "target": args.target, "eval_every_s": args.eval_every, "time_budget_s": args.time_budget}  # fmt: skip
    report: dict = {"runs": [], "commands": []}
    if args.report and not os.path.exists(args.out):
        raise SystemExit(f"--report: no sweep at {args.out} (give the JSON a sweep wrote with --out)")
    if os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
        differ = {k: (report["settings"][k], v) for k, v in settings.items() if report["settings"].get(k) != v}
        if differ and not args.report:
            raise SystemExit(f"{args.out} was measured with other settings (then, now): {differ}; use another --out")
    if not args.report:
        import torch

        report.update(
            settings=settings,
            machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            versions={"torch": torch.__version__},
        )
        report["commands"] = [*report.get("commands", []), " ".join([sys.executable, *sys.argv])]
        sweep(args, report)
    report["summary"] = summarize(report)
    save(report, args.out)
    print(table(report), flush=True)
    if rows := goals(report):
        print(goals_table(rows), flush=True)
    if report["summary"]:
        plot(report, args.plot or os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
