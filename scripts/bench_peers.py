"""LSGD against the peers a user would otherwise pick, side by side in one run, printing ratios.

1. ``--part tta`` (time to accuracy): Fashion-MNIST (``--data-dir``; without it the bundled
   digits, with a note), CNN7, W workers with batch 128 each and the same Nesterov SGD for all.
   Contenders: lsgd-ray's lsgd (sync), lsgd_async, easgd, local_sgd and data_parallel (W workers
   as groups x workers: 2 -> 1x2, 4 -> 2x2), Ray Train v2's TorchTrainer with DDP
   (``ray_train_ddp``) and one plain PyTorch process with min(W, cores) threads (``plain``).
   Measured per run: training seconds to the first evaluation >= ``--target`` (evaluation off
   the clock; every contender evaluates every ``--eval-every`` training seconds and stops at the
   target), and wall seconds of the whole call (start-up, evaluation and shutdown included).
   Goals: LSGD's time to target <= 0.7 x Ray Train DDP's; LSGD's wall <= 0.5 x Ray Train's.
2. ``--part throughput``: samples/s of every lsgd-ray algorithm and of Ray Train DDP with W
   workers (``--steps`` steps each) against W independent plain loops (separate processes, one
   thread each: ``bench_core.independent_samples_per_s``), on random MNIST-shaped images with
   the small CNN, at period ``--tau`` (τ_G = 4τ). A contender's rate is taken between its first
   evaluation and its end (samples / training seconds in between), so its start-up and first
   steps are left out and evaluation is off the clock; the independent loops are timed over
   ``--steps`` steps after as many warm-up steps. Repeats alternate the sides; the ratio is
   printed as median [min, max].

    .venv/bin/python scripts/bench_peers.py --part tta --data-dir ../shared/data   # about an hour
    .venv/bin/python scripts/bench_peers.py --part throughput --workers 4

Every run is appended to ``--out`` (JSON) as soon as it ends, with the machine, versions and
command, so nothing is lost if the benchmark dies part way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from lsgd_ray import (  # noqa: E402
    ConfigError,
    DownpourConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
    fit,
)
from lsgd_ray.baselines import Budget, plain_loop, ray_train_ddp  # noqa: E402
from lsgd_ray.data import (  # noqa: E402
    dataset_factory,
    dataset_spec,
    random_images,  # noqa: E402
)
from lsgd_ray.models import model_factory, small_cnn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import independent_samples_per_s  # noqa: E402

TTA_CONTENDERS = ["lsgd", "lsgd_async", "easgd", "local_sgd", "data_parallel", "ray_train_ddp", "plain"]
THROUGHPUT_CONTENDERS = [
    "lsgd", "lsgd_async", "easgd", "downpour", "local_sgd", "data_parallel", "dpsgd", "aldsgd", "ray_train_ddp",
]  # fmt: skip
LIBRARY = {"lsgd", "lsgd_async", "easgd", "downpour", "local_sgd", "data_parallel", "dpsgd", "aldsgd"}


def layout(workers: int) -> tuple[int, int]:
    """W workers as groups x workers per group: 2 -> 1x2, 4 -> 2x2 (two groups when W is even, >= 4)."""
    groups = 2 if workers >= 4 and workers % 2 == 0 else 1
    return groups, workers // groups


def period_configs(tau: int | None) -> dict:
    """Every algorithm's communication period set to τ (τ_G = 4τ); None: the library's defaults."""
    if tau is None:
        return {}
    return {
        "lsgd": LSGDConfig(tau=tau, tau_global=4 * tau),
        "easgd": EASGDConfig(tau=tau),
        "local_sgd": LocalSGDConfig(tau=tau, tau_global=4 * tau),
        "downpour": DownpourConfig(n_push=tau, n_fetch=tau),
        "gossip": GossipConfig(tau=tau),
    }


def run_one(name: str, workers: int, seed: int, args, data_fn, model_fn, part: str) -> dict:
    """One run of one contender; returns its row (history included)."""
    opt = OptimizerConfig(lr=args.lr)
    target = args.target if part == "tta" else None
    budget = args.time_budget if part == "tta" else None
    steps = args.steps if part == "throughput" else None
    baseline_budget = Budget(
        time_budget_s=budget, max_steps=steps, eval_every_s=args.eval_every, target_accuracy=target
    )
    tag = f"{part}-w{workers}-{name}-s{seed}-{time.strftime('%H%M%S')}"
    begin = time.perf_counter()
    if name in LIBRARY:
        groups, per_group = layout(workers)
        periods = period_configs(args.tau if part == "throughput" else None)
        lsgd = periods.get("lsgd", LSGDConfig())
        if name == "lsgd_async":
            lsgd = dataclasses.replace(lsgd, mode="async")
        cfg = TrainConfig(
            algorithm="lsgd" if name == "lsgd_async" else name,
            **{**periods, "lsgd": lsgd},
            optimizer=opt,
            num_groups=groups,
            workers_per_group=per_group,
            batch_size=args.batch,
            seed=seed,
            time_budget_s=budget,
            max_steps=steps,
            eval_every_s=args.eval_every,
            target_accuracy=target,
            output_dir=os.path.join(args.tmp, tag),
            quiet=True,
        )
        result = fit(model_fn, data_fn, cfg)
        history, startup = result.history, result.timings["startup_s"]
        samples, train_s = result.samples, result.timings["train_s"]
    elif name == "ray_train_ddp":
        result = ray_train_ddp(
            model_fn, data_fn, num_workers=workers, batch_size=args.batch, optimizer=opt, budget=baseline_budget,
            seed=seed, storage_path=os.path.abspath(args.tmp), name=tag,
        )  # fmt: skip
        history, startup, samples, train_s = result.history, result.startup_s, result.samples, result.train_s
    elif name == "plain":
        threads = min(workers, os.cpu_count() or 1)
        result = plain_loop(
            model_fn, data_fn, batch_size=args.batch, optimizer=opt, budget=baseline_budget, seed=seed,
            threads=threads,
        )  # fmt: skip
        history, startup, samples, train_s = result.history, 0.0, result.samples, result.train_s
    else:
        raise ValueError(f"unknown contender {name!r}")
    wall = time.perf_counter() - begin
    reached = next((r["train_s"] for r in history if target is not None and r["test_accuracy"] >= target), None)
    return {
        "part": part,
        "workers": workers,
        "contender": name,
        "seed": seed,
        "time_to_target_s": reached,
        "wall_s": wall,
        "startup_s": startup,
        "train_s": train_s,
        "samples": samples,
        "samples_per_s": steady_rate(history, samples, train_s),
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "history": [{k: r[k] for k in ("train_s", "samples", "step", "test_accuracy", "test_loss")} for r in history],
    }


def steady_rate(history: list[dict], samples: int, train_s: float) -> float:
    """Samples/s between the first evaluation and the last (start-up and first steps left out);
    samples / training seconds if there were fewer than two evaluations."""
    if len(history) >= 2 and history[-1]["train_s"] > history[0]["train_s"]:
        first, last = history[0], history[-1]
        return (last["samples"] - first["samples"]) / (last["train_s"] - first["train_s"])
    return samples / train_s if train_s > 0 else 0.0


def spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def ratio(a: dict | None, b: dict | None) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] > 0 else None


def summarize_tta(rows: list[dict]) -> dict:
    summary: dict = {}
    for row in rows:
        cell = summary.setdefault(str(row["workers"]), {}).setdefault(row["contender"], {"runs": []})
        cell["runs"].append(row)
    for per_w in summary.values():
        for cell in per_w.values():
            runs = cell.pop("runs")
            reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
            cell.update(
                time_to_target_s=spread(reached),
                wall_s=spread([r["wall_s"] for r in runs]),
                reached=len(reached),
                runs=len(runs),
            )
        per_w["ratios"] = lsgd_ratios(per_w)
    return summary


def lsgd_ratios(per_w: dict) -> dict:
    """The ratios the benchmark is for: LSGD's median over each peer's median (None: not reached)."""

    def over(other: str, key: str) -> float | None:
        return ratio(per_w.get("lsgd", {}).get(key), per_w.get(other, {}).get(key))

    return {
        "lsgd_tta_over_ray_train_ddp (goal <= 0.7)": over("ray_train_ddp", "time_to_target_s"),
        "lsgd_tta_over_easgd": over("easgd", "time_to_target_s"),
        "lsgd_tta_over_data_parallel": over("data_parallel", "time_to_target_s"),
        "lsgd_wall_over_ray_train_ddp (goal <= 0.5)": over("ray_train_ddp", "wall_s"),
    }


def fmt(s: dict | None) -> str:
    return "not reached" if s is None else f"{s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f})"


def tta_table(summary: dict, target: float) -> str:
    lines = [
        f"| W | contender | time to {target:.0%}, median (min-max) | reached | wall, median (min-max) |",
        "| ---: | --- | --- | ---: | --- |",
    ]
    for w, per_w in summary.items():
        for name, cell in per_w.items():
            if name != "ratios":
                lines.append(
                    f"| {w} | {name} | {fmt(cell['time_to_target_s'])} | {cell['reached']}/{cell['runs']} | {fmt(cell['wall_s'])} |"
                )
    lines.append("")
    for w, per_w in summary.items():
        for key, value in per_w["ratios"].items():
            lines.append(f"- W={w} {key}: {'n/a' if value is None else f'{value:.3f}'}")
    return "\n".join(lines)


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- 1. time to accuracy


def tta_data(args):
    """Fashion-MNIST from --data-dir, else the bundled digits; the model, or the closest that fits."""
    name = "fashion-mnist" if args.data_dir else "digits"
    if args.data_dir:  # absolute: Ray Train runs its workers in the run's own directory
        args.data_dir = os.path.abspath(args.data_dir)
    if not args.data_dir:
        print("note: no --data-dir: using the bundled digits (1x8x8), not Fashion-MNIST", flush=True)
    spec = dataset_spec(name)
    shape = spec.model_input_shape()
    try:
        model_fn, model = model_factory(args.model, shape, spec.num_classes), args.model
    except ConfigError as exc:
        print(f"note: {exc}; using 'cnn' (the small CNN) instead", flush=True)
        model_fn, model = model_factory("cnn", shape, spec.num_classes), "cnn"
    return name, dataset_factory(name, args.data_dir), model, model_fn


def bench_tta(args, report: dict) -> None:
    data, data_fn, model, model_fn = tta_data(args)
    settings = {"data": data, "model": model, "target": args.target, "eval_every_s": args.eval_every}
    earlier = report.get("tta", {})  # --append: the runs of an earlier invocation, same settings only
    differ = {k: (earlier[k], v) for k, v in settings.items() if k in earlier and earlier[k] != v}
    if differ:
        raise SystemExit(f"--append: {args.out} was measured with other settings (then, now): {differ}")
    report["tta"] = {**settings, "runs": earlier.get("runs", []), "summary": {}}
    for seed in args.seeds:  # seeds outermost: machine drift hits every contender alike
        for workers in args.workers:
            for name in args.contenders:
                row = run_one(name, workers, seed, args, data_fn, model_fn, "tta")
                report["tta"]["runs"].append(row)
                report["tta"]["summary"] = summarize_tta(report["tta"]["runs"])
                save(report, args.out)
                tta = row["time_to_target_s"]
                print(
                    f"tta seed={seed} W={workers} {name:>14}: to {args.target:.0%} "
                    f"{'not reached' if tta is None else f'{tta:6.1f} s'}  wall {row['wall_s']:6.1f} s  "
                    f"final acc {row['final_test_accuracy']:.4f}  start-up {row['startup_s']:.1f} s",
                    flush=True,
                )
    print(tta_table(report["tta"]["summary"], args.target), flush=True)


# --------------------------------------------------------------------------- 2. throughput


def bench_throughput(args, report: dict) -> None:
    data_fn = random_images
    model_fn = functools.partial(small_cnn, (1, 28, 28), 10)
    opt = OptimizerConfig(lr=args.lr)
    section = report["throughput"] = {
        "data": "random 1x28x28 images",
        "model": "small_cnn",
        "tau": args.tau,
        "eval_every_s": args.eval_every,
    }
    section.update(runs=[], summary={})
    for workers in args.workers:
        rates: dict[str, list[float]] = {}
        for repeat in range(args.repeats):  # alternate: every contender, then the independent loops
            for name in args.contenders:
                row = run_one(name, workers, 0, args, data_fn, model_fn, "throughput")
                row["repeat"] = repeat
                rates.setdefault(name, []).append(row["samples_per_s"])
                section["runs"].append(row)
                save(report, args.out)
                print(
                    f"throughput W={workers} repeat {repeat} {name:>14}: {row['samples_per_s']:8.0f} samples/s",
                    flush=True,
                )
            plain = independent_samples_per_s(workers, args.steps, args.batch, data_fn, model_fn, opt)
            rates.setdefault("independent", []).append(plain)
            section["runs"].append(
                {"workers": workers, "contender": "independent", "repeat": repeat, "samples_per_s": plain}
            )
            save(report, args.out)
            print(f"throughput W={workers} repeat {repeat} {'independent':>14}: {plain:8.0f} samples/s", flush=True)
        summary = section["summary"][str(workers)] = {}
        for name in args.contenders:
            ratios = [a / b for a, b in zip(rates[name], rates["independent"])]
            summary[name] = {"samples_per_s": spread(rates[name]), "ratio_to_independent": spread(ratios)}
            r = summary[name]["ratio_to_independent"]
            print(
                f"throughput W={workers} {name:>14}: {statistics.median(rates[name]):8.0f}/s vs independent "
                f"{statistics.median(rates['independent']):8.0f}/s  ratio {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]",
                flush=True,
            )
        summary["independent"] = {"samples_per_s": spread(rates["independent"])}
        save(report, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["tta", "throughput", "all"], default="tta")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST (torchvision raw layout); default: digits")
    parser.add_argument("--model", default="cnn7")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--contenders", nargs="+", default=None, help=f"tta: {TTA_CONTENDERS}; throughput: {THROUGHPUT_CONTENDERS}"
    )
    parser.add_argument("--batch", type=int, default=128, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05, help="Nesterov SGD, momentum 0.9, weight decay 1e-4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument("--time-budget", type=float, default=240.0, help="training seconds per tta run at most")
    parser.add_argument(
        "--eval-every", type=float, default=None, help="training seconds (default: 5 tta, 2 throughput)"
    )
    parser.add_argument("--tau", type=int, default=8, help="throughput: every algorithm's period (tau_G = 4 tau)")
    parser.add_argument("--steps", type=int, default=200, help="throughput: steps per worker per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    parser.add_argument("--out", default="runs/bench_peers.json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="tta: add to the runs already in --out (same settings) instead of replacing them",
    )
    parser.add_argument("--tmp", default="runs/bench_peers_tmp")
    args = parser.parse_args()

    # The dashboard stays on: Ray Train v2's PlacementGroupCleaner queries the state API through
    # it, and without it every TorchTrainer.fit() waits ~12 s for the cleaner at shutdown.
    ray.init(
        address="local",
        num_cpus=max(8, 2 * max(args.workers)),
        include_dashboard=not args.no_dashboard,
        logging_level="WARNING",
    )
    earlier = {}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
    command = " ".join([sys.executable, *sys.argv])
    report = {
        "command": command,
        "commands": [*earlier.get("commands", [earlier["command"]] if "command" in earlier else []), command],
        **({"tta": earlier["tta"]} if "tta" in earlier else {}),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "settings": {k: v for k, v in vars(args).items()},
    }
    try:
        for part, default_eval, valid in (("tta", 5.0, TTA_CONTENDERS), ("throughput", 2.0, THROUGHPUT_CONTENDERS)):
            if args.part not in (part, "all"):
                continue
            part_args = argparse.Namespace(**vars(args))
            part_args.eval_every = args.eval_every or default_eval
            part_args.contenders = [c for c in (args.contenders or valid) if c in valid]
            (bench_tta if part == "tta" else bench_throughput)(part_args, report)
    finally:
        ray.shutdown()
    save(report, args.out)
    print(f"figures written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
