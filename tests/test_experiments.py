"""The experiment scripts as a researcher runs them: a real process, real files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python experiments/<script> args...`` from the repository root, as a researcher runs it."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, f"experiments/{script}", *args], capture_output=True, text=True, timeout=280, cwd=ROOT, env=env
    )


@pytest.mark.timeout(300)
def test_lsgd_seeds_saves_config_code_version_and_metrics(tmp_path):
    out = tmp_path / "exp"
    proc = run_experiment(
        "lsgd_seeds.py", *("--dataset", "synthetic", "--epochs", "2", "--seeds", "0", "1", "--out", str(out))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["config"]["lsgd"]["tau"] == 4
    assert summary["code_version"] and "lsgd_seeds.py" in summary["command"]
    assert set(summary["final_test_accuracy"]["per_seed"]) == {"0", "1"}
    assert summary["final_test_accuracy"]["median"] > 0.6
    for seed in (0, 1):
        result = json.loads((out / f"seed{seed}" / "result.json").read_text())
        assert result["config"]["seed"] == seed and result["status"] == "completed"
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert all(0.0 <= float(r["test_error"]) <= 1.0 for r in rows)


@pytest.mark.timeout(300)
def test_compare_runs_every_algorithm_and_draws_the_papers_plots(tmp_path):
    out = tmp_path / "cmp"
    config = tmp_path / "figure.json"
    config.write_text(json.dumps({"dataset": "synthetic", "model": "mlp", "time_budget": 3, "seeds": [0, 1]}))
    proc = run_experiment(
        "compare.py",
        *("--config", str(config), "--algorithms", "lsgd", "easgd", "--batch-size", "32", "--eval-every", "1"),
        *("--target", "0.5", "--seeds", "0", "--out", str(out), "--lr-for", "easgd=0.02"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["dataset"] == "synthetic" and summary["args"]["seeds"] == [0]  # flag beats file
    assert set(summary["algorithms"]) == {"lsgd", "easgd"}
    assert summary["algorithms"]["easgd"]["evaluated"] == "center"
    assert summary["algorithms"]["lsgd"]["reached_target"] == "1/1"
    assert summary["algorithms"]["lsgd"]["diverged"] == summary["algorithms"]["easgd"]["diverged"] == "0/1"
    assert summary["algorithms"]["lsgd"]["final_test_accuracy"]["median"] > 0.6
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["algorithm"] for r in rows} == {"lsgd", "easgd"}
    for png in ("test_error_vs_time.png", "leaders.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lsgd = json.loads((out / "lsgd" / "seed0" / "result.json").read_text())
    easgd = json.loads((out / "easgd" / "seed0" / "result.json").read_text())
    assert lsgd["config"]["optimizer"]["lr"] == 0.05 and easgd["config"]["optimizer"]["lr"] == 0.02


def test_every_shipped_figure_config_names_real_options():
    import re

    from lsgd_ray import ALGORITHMS, DATASETS, MODELS

    script = (ROOT / "experiments" / "compare.py").read_text()
    options = {m.replace("-", "_") for m in re.findall(r'add_argument\("--([a-z-]+)"', script)}
    configs = sorted((ROOT / "experiments" / "configs").glob("*.json"))
    assert len(configs) >= 7
    for path in configs:
        settings = json.loads(path.read_text())
        assert set(settings) <= options, (path.name, set(settings) - options)
        assert settings["dataset"] in DATASETS and settings["model"] in MODELS
        assert set(settings["algorithms"]) <= set(ALGORITHMS)
