"""What a run leaves behind: ``result.json``, TensorBoard event files and the leader's weights.

TensorBoard tags (x-axis: samples seen by all workers, unless noted). ``leader/*`` is the model
the algorithm evaluates: LSGD's leader (or its center, with ``LSGDConfig.evaluate="center"``),
EASGD's center, DOWNPOUR's server, data-parallel's (shared) weights, the workers' average for
local SGD, D-PSGD and AL-DSGD.
  leader/test_accuracy, leader/test_error, leader/test_loss, leader/rank (-1: not a worker)
  leader_by_time/test_error      x-axis: training milliseconds (evaluation excluded)
  lsgd/<model>/test_accuracy, lsgd/<model>/test_error, lsgd/<model>/test_loss,
  lsgd/<model>_by_time/test_error
                                 LSGD only, at every evaluation: <model> is ``leader`` and
                                 ``center`` (the mean of all workers), whichever ``leader/*`` is
                                 (``LSGDConfig.evaluate`` picks that one)
  worker/<rank>/loss_estimate    each worker's leader-selection estimate
  worker/<rank>/bytes_sent_per_step, worker/<rank>/bytes_received_per_step
  comm/bytes_per_worker_step     weights, gradients and estimates moved (sent + received)
  comm/bytes_sent_per_worker_step, comm/bytes_received_per_worker_step
  comm/pulls, comm/exchanges     LSGD pulls applied / the peers' exchanges, summed over workers
  comm/pulls_skipped             async LSGD: pulls left out by backpressure (a worker's previous
                                 pull still queued), summed over workers and kinds
  timing/eval_s                  seconds spent in each evaluation
Every leader/* event's wall time is the run's start plus its *training* time, so TensorBoard's
"relative" axis shows training time with evaluation excluded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class FitResult:
    """The outcome of a run; also written to ``<output_dir>/result.json``."""

    output_dir: str
    status: str
    algorithm: str
    evaluated: str  # which model the accuracies are of: "leader (worker 3)", "center", ...
    final_test_accuracy: float | None
    final_test_loss: float | None
    leader: int
    steps_per_worker: int
    samples: int
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    communication: dict[str, Any] = field(default_factory=dict)
    leader_counts: list[int] = field(default_factory=list)
    leader_changes: list[tuple[int, int]] = field(default_factory=list)
    topology: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # failures handled during the run
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    # LSGD scores both its leader and its center at every evaluation (``final_test_*`` are those
    # of the one ``LSGDConfig.evaluate`` picks); None for the peers, which evaluate one model
    final_leader_test_accuracy: float | None = None
    final_leader_test_loss: float | None = None
    final_center_test_accuracy: float | None = None
    final_center_test_loss: float | None = None
    # status "diverged": the first sign (kind, step, train_s, model, evidence); see divergence.py
    divergence: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    @property
    def weights_path(self) -> str:
        return os.path.join(self.output_dir, "leader_state_dict.pt")


def communication_summary(
    stats: list[dict[str, Any]], weight_bytes: int, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Bytes each worker sent and received (weights, gradients, estimates), in total and per
    worker-step. "Sent" counts what a worker puts into the object store or pushes through a
    collective; "received" what it reads from other workers, leaders or servers. With the
    coordinator's ``status``: the asynchronous pulls left out by backpressure (per worker, and
    whole global pulls while the last leader snapshot was still queued)."""
    steps = max(sum(s["steps"] for s in stats), 1)
    per_worker = []
    for s in stats:
        row = {k: s.get(k, 0) for k in ("rank", "steps", "bytes_sent", "bytes_received", "pulls", "exchanges")}
        row["bytes_sent_per_step"] = s["bytes_sent"] / max(s["steps"], 1)
        row["bytes_received_per_step"] = s["bytes_received"] / max(s["steps"], 1)
        per_worker.append(row)
    return {
        "weight_bytes": weight_bytes,
        "per_worker": per_worker,
        "bytes_per_worker_step": sum(s["bytes_sent"] + s["bytes_received"] for s in stats) / steps,
        "bytes_sent_per_worker_step": sum(s["bytes_sent"] for s in stats) / steps,
        "bytes_received_per_worker_step": sum(s["bytes_received"] for s in stats) / steps,
        "pulls_skipped": {
            **(status or {}).get("pulls_skipped", {}),
            "global_rounds": (status or {}).get("global_pulls_skipped", 0),
        },
    }


def summary_lines(result: FitResult) -> str:
    """The closing lines a run prints: the leader's accuracy and where everything is."""
    t = result.timings
    both = ""
    if result.final_leader_test_accuracy is not None and result.final_center_test_accuracy is not None:
        both = f" (leader {result.final_leader_test_accuracy:.4f}, center {result.final_center_test_accuracy:.4f})"
    return (
        f"lsgd-ray: done ({result.algorithm}). {result.evaluated} test accuracy {result.final_test_accuracy:.4f}"
        f"{both}; "
        f"training {t['train_s']:.1f}s, evaluation {t['eval_s']:.1f}s, start-up {t['startup_s']:.1f}s\n"
        f"  results:     {os.path.join(result.output_dir, 'result.json')}\n"
        f"  weights:     {result.weights_path}\n"
        f"  tensorboard: tensorboard --logdir {os.path.join(result.output_dir, 'tensorboard')}"
    )


def test_error_curves(history: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """(training seconds, test error) of each model a run's history scores, for plots: LSGD's
    ``"leader"`` and ``"center"``, which it records at every evaluation; for the peers (or a
    history without both) only ``""``, the one evaluated model."""
    models = [m for m in ("leader", "center") if history and all(f"{m}_test_accuracy" in h for h in history)]
    keys = {m: f"{m}_test_accuracy" for m in models} if len(models) == 2 else {"": "test_accuracy"}
    return {m: ([h["train_s"] for h in history], [1.0 - h[key] for h in history]) for m, key in keys.items()}


def code_version(directory: str | os.PathLike) -> str:
    """The git commit of the checkout holding ``directory`` (marked when it has uncommitted
    changes), saved beside every experiment's results so a figure can be traced to its code."""
    import subprocess

    git = ["git", "-C", str(directory)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+uncommitted" if dirty else "")


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


class RunLogger:
    """TensorBoard events for one run, written from the driver."""

    def __init__(self, output_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
        self.start_wall = time.time()

    def log_eval(self, record: dict[str, Any]) -> None:
        step, wall = record["samples"], self.start_wall + record["train_s"]
        add = self.writer.add_scalar
        add("leader/test_accuracy", record["test_accuracy"], step, walltime=wall)
        add("leader/test_error", 1.0 - record["test_accuracy"], step, walltime=wall)
        add("leader/test_loss", record["test_loss"], step, walltime=wall)
        add("leader/rank", record["leader"], step, walltime=wall)
        add("leader_by_time/test_error", 1.0 - record["test_accuracy"], round(record["train_s"] * 1000), walltime=wall)
        for model in ("leader", "center"):  # LSGD: both models at every evaluation
            if f"{model}_test_accuracy" not in record:
                continue
            accuracy, loss = record[f"{model}_test_accuracy"], record[f"{model}_test_loss"]
            add(f"lsgd/{model}/test_accuracy", accuracy, step, walltime=wall)
            add(f"lsgd/{model}/test_error", 1.0 - accuracy, step, walltime=wall)
            add(f"lsgd/{model}/test_loss", loss, step, walltime=wall)
            add(f"lsgd/{model}_by_time/test_error", 1.0 - accuracy, round(record["train_s"] * 1000), walltime=wall)
        add("timing/eval_s", record["eval_s"], step, walltime=wall)
        self.writer.flush()

    def log_divergence(self, divergence: Any, samples: int) -> None:
        """A marker where the run diverged: a scalar spike and the evidence as text."""
        wall = self.start_wall + divergence.train_s
        self.writer.add_scalar("run/diverged", 1.0, samples, walltime=wall)
        self.writer.add_text("run/diverged", divergence.warning(), samples, walltime=wall)
        self.writer.flush()

    def log_workers(self, estimates: list[float], samples: int, comm: dict[str, Any]) -> None:
        add = self.writer.add_scalar
        for rank, value in enumerate(estimates):
            if math.isfinite(value):
                add(f"worker/{rank}/loss_estimate", value, samples)
        for row in comm["per_worker"]:
            add(f"worker/{row['rank']}/bytes_sent_per_step", row["bytes_sent_per_step"], samples)
            add(f"worker/{row['rank']}/bytes_received_per_step", row["bytes_received_per_step"], samples)
        for key in ("bytes_per_worker_step", "bytes_sent_per_worker_step", "bytes_received_per_worker_step"):
            add(f"comm/{key}", comm[key], samples)
        add("comm/pulls", sum(row["pulls"] for row in comm["per_worker"]), samples)
        add("comm/exchanges", sum(row["exchanges"] for row in comm["per_worker"]), samples)
        skipped = comm["pulls_skipped"]
        add("comm/pulls_skipped", skipped.get("local", 0) + skipped.get("global", 0), samples)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
