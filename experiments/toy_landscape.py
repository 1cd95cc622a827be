"""LGD / LSGD against EAGD / EASGD on the symmetric 2-D landscape f(x, y) = (x² − 1)² + (y² − 1)².

Reads top to bottom, single process, a few seconds on one core. Two starts: workers placed
symmetrically around the local maximum at the origin, and workers drawn at random. Then the same
comparison over --trials random starts, to see how often EAGD's center ends away from a
stationary point.

    .venv/bin/python experiments/toy_landscape.py
    .venv/bin/python experiments/toy_landscape.py --workers 8 --steps 2000 --output-dir runs/toy-8

Output (default runs/toy-landscape-<time>/):
    config.json          arguments, seed, code version, command line
    metrics.json         per start and method: where the leader / center ends, its value and ‖∇f‖;
                         and the statistics over the random trials
    trajectories.csv     start, method, step, worker ("center" for EA(S)GD), x, y, value
    trajectories_<start>.png   worker paths over the contour plot, one panel per method
    objective_<start>.png      f per worker (and the center) against steps
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from lsgd_ray import toy
from lsgd_ray.results import code_version

REPO = Path(__file__).resolve().parents[1]


def grad_norm(point: np.ndarray) -> float:
    return float(np.linalg.norm(toy.gradient(point)))


def nearest_stationary(point: np.ndarray) -> dict:
    """Which analytic stationary point is closest, and how far: minimum, saddle or maximum."""
    kinds = ["minimum"] * 4 + ["saddle"] * 4 + ["maximum"]
    distances = np.linalg.norm(toy.STATIONARY_POINTS - point, axis=1)
    k = int(np.argmin(distances))
    return {"kind": kinds[k], "point": toy.STATIONARY_POINTS[k].tolist(), "distance": float(distances[k])}


def summarize(run: toy.LandscapeRun, tau: int) -> dict:
    """The reference point of a run (final leader or center) and how stationary it is."""
    if run.leaders is not None:
        leader = int(run.leaders[-1])
        point = run.positions[-1, leader]
        # Count elections only (every τ steps), not the steps in between that repeat the last one.
        elected = run.leaders[::tau]
        extra = {"leader": leader, "times_leader": np.bincount(elected, minlength=run.positions.shape[1]).tolist()}
    else:
        point = run.center[-1]
        extra = {}
    return {
        "reference": "leader" if run.leaders is not None else "center",
        "position": point.tolist(),
        "value": float(toy.objective(point)),
        "grad_norm": grad_norm(point),
        "nearest_stationary": nearest_stationary(point),
        "worker_values": run.values[-1].tolist(),
        **extra,
    }


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--workers", type=int, default=4, help="a multiple of 4 (the symmetric start needs one per quadrant)"
)
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--lr", type=float, default=0.02)
parser.add_argument("--tau", type=int, default=10, help="communication period, in steps")
parser.add_argument("--lam", type=float, default=0.2, help="L(S)GD pull toward the leader")
parser.add_argument("--alpha", type=float, default=0.1, help="EA(S)GD elastic strength (at most 1/workers)")
parser.add_argument("--grad-noise", type=float, default=0.5, help="std of the gradient noise in LSGD / EASGD")
parser.add_argument("--value-noise", type=float, default=0.1, help="std of the noise on f when LSGD elects")
parser.add_argument("--radius", type=float, default=0.5, help="distance of the symmetric start from the origin")
parser.add_argument("--trials", type=int, default=20, help="random starts for the statistics")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output-dir", default=None)
args = parser.parse_args()

out = Path(args.output_dir or REPO / "runs" / f"toy-landscape-{datetime.now():%Y%m%d-%H%M%S}")
out.mkdir(parents=True, exist_ok=True)
config = {"args": vars(args), "seed": args.seed, "code_version": code_version(REPO), "command": " ".join(sys.argv)}
(out / "config.json").write_text(json.dumps(config, indent=2))

# The four methods from two starts.
starts = {
    "symmetric": toy.symmetric_start(args.workers, args.radius),
    "random": toy.random_start(args.workers, seed=args.seed),
}
common = {"steps": args.steps, "lr": args.lr, "tau": args.tau}
runs = {}
for k, (start_name, start) in enumerate(starts.items()):
    # A different noise stream per start: with a shared one, two runs that end in the same basin
    # synchronise (the basin contracts, the noise is common) and print identical numbers.
    noise = {"grad_noise": args.grad_noise, "seed": args.seed + k}
    runs[start_name] = {
        "LGD": toy.run_landscape(start, "lgd", strength=args.lam, **common),
        "LSGD": toy.run_landscape(start, "lgd", strength=args.lam, value_noise=args.value_noise, **common, **noise),
        "EAGD": toy.run_landscape(start, "eagd", strength=args.alpha, **common),
        "EASGD": toy.run_landscape(start, "eagd", strength=args.alpha, **common, **noise),
    }

# Trajectories, long format: one row per (run, step, worker), the center as one more "worker".
with open(out / "trajectories.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["start", "method", "step", "worker", "x", "y", "value"])
    for start_name, by_method in runs.items():
        for method, run in by_method.items():
            for step in range(args.steps + 1):
                for worker, (x, y) in enumerate(run.positions[step]):
                    writer.writerow([start_name, method, step, worker, x, y, run.values[step, worker]])
                if run.center is not None:
                    x, y = run.center[step]
                    writer.writerow([start_name, method, step, "center", x, y, run.center_values[step]])

# Plots: paths over the contour plot, and f per worker against steps.
grid = np.linspace(-1.8, 1.8, 200)
mesh = np.stack(np.meshgrid(grid, grid), axis=-1)
for start_name, by_method in runs.items():
    fig, axes = plt.subplots(2, 2, figsize=(10, 10), sharex=True, sharey=True)
    for ax, (method, run) in zip(axes.flat, by_method.items()):
        ax.contour(grid, grid, toy.objective(mesh), levels=np.linspace(0, 4, 17), cmap="Greys", linewidths=0.6)
        for worker in range(args.workers):
            line = ax.plot(*run.positions[:, worker].T, lw=1, label=f"worker {worker}")[0]
            ax.plot(*run.positions[0, worker], "o", color=line.get_color())
            ax.plot(*run.positions[-1, worker], "x", color=line.get_color(), ms=9)
        if run.center is not None:
            center_line = ax.plot(*run.center.T, "k--", lw=1.5, label="center (final: star)")[0]
            ax.plot(*run.center[-1], "k*", ms=14)
            ax.legend(handles=[center_line], fontsize=8, loc="lower left")
        else:
            ax.plot(*run.positions[-1, run.leaders[-1]], "k*", ms=14, label="final leader")
        ax.plot(*toy.MINIMA.T, "g+", ms=12, mew=2)
        ax.set_title(f"{method} ({start_name} start)")
        ax.set_aspect("equal")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / f"trajectories_{start_name}.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey=True)
    for ax, (method, run) in zip(axes.flat, by_method.items()):
        for worker in range(args.workers):
            ax.plot(run.values[:, worker], lw=1, label=f"worker {worker}")
        if run.center is not None:
            ax.plot(run.center_values, "k--", lw=1.5, label="center")
        ax.set_title(f"{method} ({start_name} start)")
        ax.set_xlabel("step")
        ax.set_ylabel("f")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"objective_{start_name}.png", dpi=100)
    plt.close(fig)

# The batch methods over many random starts: is the leader / center a stationary point?
trials = []
for trial in range(args.trials):
    start = toy.random_start(args.workers, seed=args.seed + 1 + trial)
    lgd, eagd = (
        toy.run_landscape(start, "lgd", strength=args.lam, **common),
        toy.run_landscape(start, "eagd", strength=args.alpha, **common),
    )
    trials.append(
        {
            "lgd_leader_grad_norm": grad_norm(lgd.positions[-1, lgd.leaders[-1]]),
            "lgd_leader_value": float(lgd.values[-1, lgd.leaders[-1]]),
            "eagd_center_grad_norm": grad_norm(eagd.center[-1]),
            "eagd_center_value": float(eagd.center_values[-1]),
        }
    )
trial_stats = {}
for key in trials[0] if trials else []:
    values = [t[key] for t in trials]
    trial_stats[key] = {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}
stationary = 1e-6  # ‖∇f‖ below this counts as a stationary point; f has curvature 8 at its minima
metrics = {
    "runs": {
        start_name: {m: summarize(r, args.tau) for m, r in by_method.items()} for start_name, by_method in runs.items()
    },
    "trials": {
        "count": args.trials,
        "stats": trial_stats,
        "eagd_center_not_stationary": sum(t["eagd_center_grad_norm"] > stationary for t in trials),
        "lgd_leader_not_stationary": sum(t["lgd_leader_grad_norm"] > stationary for t in trials),
        # A stationary center can still be a saddle or the maximum; f < 1e-6 means a global minimum.
        "eagd_center_at_minimum": sum(t["eagd_center_value"] < 1e-6 for t in trials),
        "lgd_leader_at_minimum": sum(t["lgd_leader_value"] < 1e-6 for t in trials),
        "stationary_threshold": stationary,
        "per_trial": trials,
    },
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))

# Summary: the paper's claims, checked on these runs.
print(f"toy landscape, {args.workers} workers, {args.steps} steps, written to {out}")
for start_name in runs:
    for method, s in metrics["runs"][start_name].items():
        near = s["nearest_stationary"]
        print(
            f"  {start_name:9s} {method:5s} final {s['reference']:6s} at ({s['position'][0]:+.3f}, {s['position'][1]:+.3f})"
            f"  f={s['value']:.3g}  |grad f|={s['grad_norm']:.2e}  nearest stationary: {near['kind']}"
            f" at distance {near['distance']:.2e}"
        )
sym = metrics["runs"]["symmetric"]
print(
    f"claim 'the leader breaks the symmetry': from the symmetric start the EAGD center ends at f={sym['EAGD']['value']:.3g}"
    f" (nearest stationary point: {sym['EAGD']['nearest_stationary']['kind']}), the LGD leader at"
    f" f={sym['LGD']['value']:.3g} ({sym['LGD']['nearest_stationary']['kind']}); LGD's tie is broken by worker index,"
    f" LSGD's by the noise (leader {sym['LSGD']['leader']}, f={sym['LSGD']['value']:.3g})."
)
if trials:
    t = metrics["trials"]
    print(
        f"claim 'the leader is a stationary point, the center need not be' ({args.trials} random starts, batch methods):"
        f" LGD leader |grad f| > {stationary:g} in {t['lgd_leader_not_stationary']}/{args.trials} (max"
        f" {trial_stats['lgd_leader_grad_norm']['max']:.1e}); EAGD center in {t['eagd_center_not_stationary']}/{args.trials}"
        f" (median |grad f| {trial_stats['eagd_center_grad_norm']['median']:.2f},"
        f" median f {trial_stats['eagd_center_value']['median']:.2f} vs LGD leader's"
        f" {trial_stats['lgd_leader_value']['median']:.1e}); at a global minimum (f < 1e-6): LGD leader"
        f" {t['lgd_leader_at_minimum']}/{args.trials}, EAGD center {t['eagd_center_at_minimum']}/{args.trials}."
    )
print("  (LSGD / EASGD values carry gradient noise: expect |grad f| of order the noise, not 0.)")
