"""The benchmark's non-lsgd-ray contenders (lsgd_ray/baselines.py) and scripts/bench_peers.py:
the plain loop and Ray Train DDP train, stop at the target, keep evaluation off the clock, stay
in step across ranks, and refuse bad input; the benchmark script runs end to end at tiny size."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from lsgd_ray import OptimizerConfig, TrainConfig
from lsgd_ray.baselines import Budget, plain_loop, ray_train_ddp
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp
from tests.helpers import big_batch_loop
from tests.helpers import plain_loop as reference_loop

ROOT = Path(__file__).resolve().parents[1]
MODEL = functools.partial(mlp, (16,), 4, hidden=32)
DATA = functools.partial(synthetic, n_train=1024, n_test=512)
SGD = OptimizerConfig(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.fixture(scope="module")
def local_ray():
    # With the dashboard: Ray Train v2's PlacementGroupCleaner asks the state API (served by the
    # dashboard) about its controller; without it every fit() waits ~12 s for the cleaner to stop.
    ray.init(address="local", num_cpus=8, include_dashboard=True, logging_level="WARNING")
    yield
    ray.shutdown()


class SlowEval(nn.Module):
    """The MLP, but every forward pass in eval mode takes 0.5 s longer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MODEL()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            time.sleep(0.5)
        return self.net(x)


def test_plain_loop_is_the_reference_loop_and_counts_steps():
    """Same seed, shard (all of it), batch order and optimizer as a lsgd-ray worker alone."""
    cfg = TrainConfig(batch_size=16, seed=3, optimizer=SGD, epochs=1)
    result = plain_loop(
        MODEL, DATA, batch_size=16, optimizer=SGD, budget=Budget(max_steps=25, eval_every_s=0.01), seed=3,
        threads=1, return_weights=True,
    )  # fmt: skip
    expected, _ = reference_loop(0, 1, 25, cfg, MODEL, DATA)
    assert torch.equal(result.extra["weights"], expected)  # evaluations in between change nothing
    assert result.steps == 25 and result.samples == 25 * 16 and result.samples_per_s > 0
    assert result.history[-1]["step"] == 25 and result.history[-1]["samples"] == 25 * 16


def test_plain_loop_with_shards_redealt_is_a_loop_over_torchs_distributed_sampler():
    """One rank of one: every epoch a fresh permutation seeded with seed + epoch."""
    cfg = TrainConfig(batch_size=16, seed=3, optimizer=SGD, epochs=1, redeal_shards=True)
    steps = 2 * len(DATA().y_train) // 16 + 3  # into a third epoch
    result = plain_loop(
        MODEL, DATA, batch_size=16, optimizer=SGD, budget=Budget(max_steps=steps, eval_every_s=30.0), seed=3,
        threads=1, return_weights=True, redeal_shards=True,
    )  # fmt: skip
    expected, _ = reference_loop(0, 1, steps, cfg, MODEL, DATA)
    assert torch.equal(result.extra["weights"], expected)
    fixed, _ = reference_loop(0, 1, steps, TrainConfig(batch_size=16, seed=3, optimizer=SGD, epochs=1), MODEL, DATA)
    assert not torch.equal(fixed, expected)  # the option changes the batches


def test_plain_loop_stops_at_the_first_evaluation_reaching_the_target():
    budget = Budget(time_budget_s=30, eval_every_s=0.05, target_accuracy=0.85)
    result = plain_loop(MODEL, DATA, batch_size=16, optimizer=SGD, budget=budget, threads=1)
    accuracies = [r["test_accuracy"] for r in result.history]
    assert accuracies[-1] >= 0.85 and all(a < 0.85 for a in accuracies[:-1]), accuracies
    assert result.train_s < 30 and result.time_to(0.85) == result.history[-1]["train_s"]
    steps = [r["step"] for r in result.history]
    assert steps == sorted(steps) and result.steps == steps[-1]


def test_plain_loop_keeps_evaluation_off_the_clock():
    # Each evaluation sleeps 0.5 s; were it on the clock, evaluations would be >= 0.5 s apart
    # and the 1 s budget would end after two of them.
    budget = Budget(time_budget_s=1.0, eval_every_s=0.2)
    result = plain_loop(SlowEval, DATA, batch_size=16, optimizer=SGD, budget=budget, threads=1)
    assert len(result.history) >= 5 and result.eval_s >= 2.5, (len(result.history), result.eval_s)
    assert 1.0 <= result.train_s < 1.45, result.train_s  # the budget is training time only
    assert result.wall_s >= result.train_s + result.eval_s
    times = [r["train_s"] for r in result.history]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert gaps[len(gaps) // 2] < 0.45, gaps  # 0.2 s of training apart (plus a step), not 0.7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"time_budget_s": -1.0}, "time_budget_s"),
        ({"time_budget_s": None}, "give a budget"),
        ({"eval_every_s": 0.0}, "eval_every_s"),
        ({"target_accuracy": 1.5}, "target_accuracy"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_a_bad_budget_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**{"time_budget_s": 1.0, **kwargs})


def test_a_bad_batch_size_is_refused_by_both_baselines():
    base = {"batch_size": 0, "optimizer": SGD, "budget": Budget(time_budget_s=1.0)}
    with pytest.raises(ValueError, match="batch_size"):
        plain_loop(MODEL, DATA, **base)
    with pytest.raises(ValueError, match="batch_size"):
        ray_train_ddp(MODEL, DATA, num_workers=2, **base)


def test_ray_train_ddp_refuses_bad_worker_settings():
    base = {"batch_size": 16, "optimizer": SGD, "budget": Budget(time_budget_s=1.0)}
    for kwargs, message in [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 2, "cpus_per_worker": 0}, "cpus_per_worker"),
        ({"num_workers": 2, "decide_every": 0}, "decide_every"),
        ({"num_workers": 2, "use_gpu": True}, "CPU"),
        ({"num_workers": 2, "comm_hook": "zip"}, "comm_hook must be one of"),
        ({"num_workers": 2, "comm_hook": "powersgd", "powersgd_rank": 0}, "powersgd_rank"),
    ]:
        with pytest.raises(ValueError, match=message):
            ray_train_ddp(MODEL, DATA, **base, **kwargs)
    with pytest.raises(ValueError, match="threads"):
        plain_loop(MODEL, DATA, **base, threads=0)


@pytest.mark.timeout(400)
def test_bench_peers_script_runs_both_parts_and_writes_its_json(tmp_path):
    # before the module's Ray starts (the script starts its own): 2 cores are shared
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_peers.py"), "--part", "all", "--workers", "2", "--seeds", "0",
        "--contenders", "lsgd", "ray_train_ddp", "plain", "--time-budget", "10", "--eval-every", "0.5",
        "--target", "0.5", "--steps", "30", "--repeats", "1", "--batch", "32",
        "--out", str(out), "--tmp", str(tmp_path / "tmp"),
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "digits" in done.stdout and "using 'cnn'" in done.stdout  # no data dir: said so
    report = json.loads(out.read_text())
    assert report["command"].endswith("--tmp " + str(tmp_path / "tmp"))
    assert {"cpus", "platform"} <= set(report["machine"]) and {"torch", "ray"} <= set(report["versions"])
    tta = report["tta"]
    assert tta["data"] == "digits" and tta["model"] == "cnn"
    assert [r["contender"] for r in tta["runs"]] == ["lsgd", "ray_train_ddp", "plain"]
    for row in tta["runs"]:
        first = next((r["train_s"] for r in row["history"] if r["test_accuracy"] >= 0.5), None)
        assert row["time_to_target_s"] == first and row["wall_s"] >= row["train_s"], row
    for row in tta["runs"][:2]:  # 50% on digits comes within seconds (plain's threads may crawl on a busy machine)
        assert row["time_to_target_s"] is not None, row
    cells = tta["summary"]["2"]
    assert cells["lsgd"]["reached"] == 1 and cells["plain"]["runs"] == 1
    assert cells["ratios"]["lsgd_tta_over_ray_train_ddp (goal <= 0.7)"] > 0
    assert cells["ratios"]["lsgd_wall_over_ray_train_ddp (goal <= 0.5)"] > 0
    assert "| 2 | ray_train_ddp |" in done.stdout
    throughput = report["throughput"]
    assert [r["contender"] for r in throughput["runs"]] == ["lsgd", "ray_train_ddp", "independent"]
    for name in ("lsgd", "ray_train_ddp"):
        assert throughput["summary"]["2"][name]["ratio_to_independent"]["median"] > 0
    # --append: more runs join the earlier ones (a long benchmark can go on in pieces)
    part = command.index("--part")
    contenders = command.index("--contenders")
    more = command[: part + 1] + ["tta"] + command[part + 2 : contenders + 1] + ["plain"] + command[contenders + 4 :]
    again = subprocess.run([*more, "--append"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["contender"] for r in report["tta"]["runs"]] == ["lsgd", "ray_train_ddp", "plain", "plain"]
    assert report["tta"]["summary"]["2"]["plain"]["runs"] == 2 and len(report["commands"]) == 2
    target = more.index("--target")
    other = more[: target + 1] + ["0.6"] + more[target + 2 :]
    refused = subprocess.run([*other, "--append"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert refused.returncode != 0 and "other settings" in refused.stderr and "'target': (0.5, 0.6)" in refused.stderr
    assert len(json.loads(out.read_text())["tta"]["runs"]) == 4  # nothing lost


@pytest.mark.timeout(240)
def test_ray_train_ddp_trains_in_step_and_stops_at_the_target(local_ray, tmp_path):
    result = ray_train_ddp(
        MODEL, DATA, num_workers=2, batch_size=16, optimizer=SGD, seed=1, decide_every=1, return_weights=True,
        budget=Budget(time_budget_s=60, eval_every_s=0.05, target_accuracy=0.9), storage_path=str(tmp_path), name="ddp",
    )  # fmt: skip
    history = result.history
    accuracies = [r["test_accuracy"] for r in history]
    assert accuracies[-1] >= 0.9 and all(a < 0.9 for a in accuracies[:-1]), accuracies
    times = [r["train_s"] for r in history]
    assert times == sorted(times) and result.train_s == pytest.approx(times[-1]) and result.train_s < 60
    assert result.steps == history[-1]["step"] and result.samples == result.steps * 16 * 2
    assert result.startup_s > 0 and result.wall_s > result.startup_s + result.train_s
    # the ranks took the same steps on the same weights: equal digests, and the weights are those
    # of one process stepping on the union of the two ranks' batches (DDP averages the gradients)
    digests = result.extra["digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    cfg = TrainConfig(batch_size=16, seed=1, optimizer=SGD, epochs=1)
    expected = big_batch_loop(2, result.steps, cfg, MODEL, DATA)
    torch.testing.assert_close(torch.tensor(result.extra["weights"]), expected, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "ddp_result.json").exists()


# over 1 MiB of gradients: DDP makes two buckets, whose PowerSGD collectives must not interleave
WIDE = functools.partial(mlp, (16,), 4, hidden=640)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("hook,model", [("powersgd", MODEL), ("powersgd", WIDE), ("bf16", MODEL)])
def test_ray_train_ddp_compresses_gradients_with_torchs_comm_hooks(local_ray, tmp_path, hook, model):
    steps = 24
    result = ray_train_ddp(
        model, DATA, num_workers=2, batch_size=16, optimizer=SGD, seed=1, budget=Budget(max_steps=steps, eval_every_s=60),
        return_weights=True, storage_path=str(tmp_path), name=hook, comm_hook=hook, powersgd_start=4,
    )  # fmt: skip
    digests = result.extra["digests"]
    assert result.steps == steps and digests[0] == digests[1]  # the replicas still agree
    cfg = TrainConfig(batch_size=16, seed=1, optimizer=SGD, epochs=1)
    exact = big_batch_loop(2, steps, cfg, model, DATA)  # uncompressed DDP's weights
    gap = (torch.tensor(result.extra["weights"]) - exact).abs().max().item()
    # the hook is in the path: the weights are not those of exact averaging, yet close to them
    assert 1e-4 < gap < (0.5 if hook == "powersgd" else 0.05), gap
