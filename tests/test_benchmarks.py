"""The benchmark scripts run end to end at a tiny size and write what they promise.

Each runs as a subprocess, as a user runs it (`python scripts/x.py`), with its own Ray; the
figures themselves are not checked (they depend on the machine), only their shape and sense.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_scaling_measures_both_parts_and_plots(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    done = run_script(
        "bench_scaling.py",
        *("--workers", "1", "2", "--nodes", "1", "2", "--rounds", "4", "--warmup-rounds", "1", "--repeats", "1"),
        *("--out", str(out), "--plot", str(png), "--tmp", str(tmp_path / "tmp")),
        timeout=570,
    )
    report = json.loads(out.read_text())
    assert "bench_scaling.py" in report["command"] and "--rounds 4" in report["command"]
    assert report["machine"]["cpus"] >= 1 and report["versions"]["ray"] and report["versions"]["torch"]
    for key, counts in (("workers", [1, 2]), ("nodes", [1, 2])):
        rows = report[key]["rows"]
        assert [r[key] for r in rows] == counts
        for r in rows:
            assert len(r["samples"]) == 1
            assert r["samples"][0]["rounds"] == 4
            assert r["coordination_ms_per_round"] > 0 and r["compute_ms_per_round"] > 0
            assert r["coordination_ms_min"] <= r["coordination_ms_per_round"] <= r["coordination_ms_max"]
            assert 0 < r["coordination_share"] < 1
            assert r["coordination_ms_per_worker"] == pytest.approx(r["coordination_ms_per_round"] / r["workers"])
            assert r["placement"]["as_planned"]
        growth = report[key]["growth"]
        assert growth["count_ratio"] == 2 and growth["cost_ratio"] > 0
        assert growth["exponent_min"] <= growth["exponent"] <= growth["exponent_max"]
        assert f"| {key} |" in done.stdout  # the markdown table
    # workers part: one group on the one node
    assert [r["groups"] for r in report["workers"]["rows"]] == [1, 1]
    assert [r["workers"] for r in report["workers"]["rows"]] == [1, 2]
    # nodes part: one group of 2 workers per node, each group on a node of its own
    assert report["nodes"]["workers_per_node"] == 2
    for r in report["nodes"]["rows"]:
        assert r["groups"] == r["nodes"] and r["workers"] == 2 * r["nodes"]
        groups = r["placement"]["groups"]
        assert r["placement"]["groups_on_distinct_nodes"]
        assert len({g["planned_node"] for g in groups}) == r["nodes"]
        assert all(g["worker_nodes"] == [g["planned_node"]] * 2 for g in groups)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_core_broadcast(tmp_path):
    out = tmp_path / "core.json"
    run_script(
        "bench_core.py",
        *("--part", "broadcast", "--sizes-mb", "1", "--workers", "2", "--repeats", "1"),
        *("--out", str(out), "--tmp", str(tmp_path / "tmp")),
        timeout=270,
    )
    report = json.loads(out.read_text())
    assert "throughput" not in report
    [row] = report["broadcast"]
    assert row["size_mb"] == 1 and row["workers"] == 2 and row["pullers"] == 1
    assert row["copy_s"] > 0 and row["publish_s"] > 0 and row["pull_all_s"] > 0
    assert row["copies_s"] > 0  # the bound of one concurrent copy per puller
    assert row["pull_all_over_copies"] == pytest.approx(row["pull_all_s"] / row["copies_s"])
    assert row["zero_copy"] is True  # the follower read the object store's shared memory


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_core_throughput(tmp_path):
    out = tmp_path / "core.json"
    run_script(
        "bench_core.py",
        *("--part", "throughput", "--workers", "2", "--taus", "4", "--steps", "8", "--repeats", "1"),
        *("--out", str(out), "--tmp", str(tmp_path / "tmp")),
        timeout=270,
    )
    report = json.loads(out.read_text())
    assert "broadcast" not in report
    [row] = report["throughput"]
    assert (row["workers"], row["groups"], row["tau"], row["tau_global"]) == (2, 1, 4, 16)
    assert row["steps_per_worker"] == 16  # at least 4 tau
    assert row["lsgd_samples_per_s"] > 0 and row["independent_samples_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["lsgd_samples_per_s"] / row["independent_samples_per_s"])
    assert 0 <= row["coordination_share_of_round"] < 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nodes", [1, 2])
def test_startup_breakdown_names_every_actor_and_its_phases(tmp_path, nodes):
    """On a local Ray (1 group of 2), and on a 2-node Cluster (a group of 1 on each node)."""
    out = tmp_path / "startup.json"
    argv = ("--", "--dataset", "synthetic", "--groups", "1", "--workers-per-group", "2")
    done = run_script("startup_breakdown.py", "--json", str(out), "--nodes", str(nodes), *argv, timeout=270)
    report = json.loads(out.read_text())
    actors = sorted(row["actor"] for row in report["actors"])
    # the evaluator is part of the driver; every actor the run made reported (no wait for more)
    assert actors == ["GlobalLeader", *["LocalLeader"] * nodes, "Worker", "Worker"], report
    assert report["all_reported"], report
    assert report["nodes"] == nodes and len({g["node_id"] for g in report["groups"]}) == nodes, report
    assert all(set(g["worker_nodes"]) == {g["node_id"]} for g in report["groups"]), report  # a group's node
    for row in report["actors"]:
        assert 0 <= row["asked_s"] <= row["ready_at_s"] <= report["total_s"], row
        assert row["waited_for_process_s"] >= 0 and row["loading_arguments_s"] >= 0 and row["init_s"] >= 0, row
    workers = [row for row in report["actors"] if row["actor"] == "Worker"]
    leader = next(row for row in report["actors"] if row["actor"] == "LocalLeader")
    assert all(w["asked_s"] >= leader["asked_s"] for w in workers)  # the LocalLeader asks for its workers
    assert 0 < report["ray_init_s"] < report["total_s"] and "every actor ready" in done.stdout


@pytest.mark.parametrize("period", [4, 16, 64])
def test_every_contender_of_the_bandwidth_sweep_has_a_valid_config(period):
    """The sweep's runs take hours; a contender whose settings do not make a TrainConfig must
    fail here, not after the others ran. No cluster: the configs only."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_bandwidth

    fitted = [c for c in bench_bandwidth.CONTENDERS if c != "plain" and not c.startswith("ray_train")]
    assert {"lsgd_reference", "lsgd_bf16", "diloco", "diloco_flat", "diloco_streaming"} <= set(fitted)
    assert "data_parallel_powersgd" in fitted
    configs = {}
    for name in fitted:
        spec = {"contender": name, "period": period, "lr": 0.05, "nodes": 2, "per_node": 2, "batch": 128, "seed": 0}
        configs[name] = cfg = bench_bandwidth.contender_config(spec, epochs=1)
        assert cfg.algorithm == bench_bandwidth.ALGORITHM_OF.get(name, name)
        assert cfg.num_groups == 2 and cfg.optimizer.lr == 0.05
    assert configs["lsgd_bf16"].comm_dtype == "bfloat16" and configs["lsgd"].comm_dtype == "float32"
    assert configs["data_parallel_powersgd"].data_parallel.compression == "powersgd"
    assert configs["diloco_flat"].diloco.tau is None and configs["diloco_flat"].diloco.fragments == 1
    assert configs["diloco_streaming"].diloco.fragments == 4 and configs["diloco_streaming"].diloco.tau is None
    reference = bench_bandwidth.contender_config({**spec, "contender": "lsgd_reference"}, epochs=1)
    assert reference.redeal_shards and reference.lsgd.proximal == 0.1 and reference.lsgd.tau_global == period
    diloco = bench_bandwidth.contender_config({**spec, "contender": "diloco"}, epochs=1)
    assert (diloco.diloco.tau, diloco.diloco.tau_global) == (max(1, period // 4), period)


def test_the_bandwidth_tuning_searches_by_coordinates_and_cuts_runs_that_cannot_win():
    """Per periodic contender: the three learning rates at the default period (the default
    first), then the two other periods at the best of them; data-parallel: the rates only. Each
    run's budget ends one evaluation after its contender's fastest time so far; the choice is the
    fastest run to the target; a run already in the report is not planned again."""
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_bandwidth as bw

    args = argparse.Namespace(tune=True, tune_rate="100mbit", tune_seed=100, time_budget=300.0, eval_every=15.0,
                              contenders=["lsgd", "lsgd_bf16", "lsgd_async", "data_parallel", "plain"])  # fmt: skip
    report: dict = {"runs": []}

    def planned(name):
        return [(t["lr"], t["period"]) for t in bw.plan(args, report) if t["contender"] == name]

    def ran(lr, period, tta, final):
        report["runs"].append({"contender": "lsgd", "layout": "2x2", "rate": "100mbit", "seed": 100, "lr": lr,
                               "period": period, "tuning": True, "time_to_target_s": tta, "final_test_accuracy": final})  # fmt: skip

    assert planned("lsgd") == [(0.05, 16), (0.1, 16), (0.02, 16)]
    assert planned("data_parallel") == [(0.05, 16), (0.1, 16), (0.02, 16)]
    assert planned("lsgd_bf16") == planned("lsgd_async") == planned("plain") == []  # both run on lsgd's choice
    assert bw.tuning_budget(report, "lsgd", args) == 300.0  # nothing measured yet: the full budget
    ran(0.05, 16, 120.0, 0.89)
    assert bw.tuning_budget(report, "lsgd", args) == 135.0
    assert bw.tuning_budget(report, "data_parallel", args) == 300.0  # each contender its own bound
    ran(0.1, 16, 100.0, 0.885)
    assert planned("lsgd") == [(0.02, 16)]  # the periods wait for the last rate
    ran(0.02, 16, None, 0.86)  # cut at 115 s, never got there
    assert planned("lsgd") == [(0.1, 4), (0.1, 64)]  # the periods at the best rate
    ran(0.1, 4, 90.0, 0.88)
    assert bw.tuning_budget(report, "lsgd", args) == 105.0
    report["tuning"] = {"chosen": bw.choose(report, args)}
    assert report["tuning"]["chosen"]["lsgd"] == {"lr": 0.1, "period": 4, "time_to_target_s": 90.0}
    assert bw.chosen_settings(report, "lsgd_bf16") == bw.chosen_settings(report, "lsgd_async") == (0.1, 4, True)


def test_the_bandwidth_goals_compare_the_authors_lsgd_with_ddp_and_the_fastest_other_contender():
    """#14's goals, decided from the summary: at 100 Mbit/s LSGD (as its authors run it) within
    0.5 x Ray Train DDP's time and below every other contender. A censored median (runs that
    never reached the target) is a lower bound: it decides a goal only where the bound does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_bandwidth as bw

    def cell(median, censored=False):
        return {"time_to_target_s": {"median": median, "censored": censored, "min": median, "max": median, "n": 1}}

    summary = {
        "100mbit": {"lsgd_reference (center)": cell(40.0), "lsgd (center)": cell(10.0),
                    "ray_train_ddp": cell(100.0), "local_sgd": cell(50.0), "plain": cell(5.0)},
        # DDP's median is at least 150 s: LSGD is within 0.27x, but local SGD is faster
        "30mbit": {"lsgd_reference (center)": cell(40.0), "ray_train_ddp": cell(150.0, True), "local_sgd": cell(30.0)},
        # LSGD's median is at least 300 s: at least 15x DDP's
        "none": {"lsgd_reference (center)": cell(300.0, True), "ray_train_ddp": cell(20.0)},
        "1gbit": {"lsgd_reference (center)": cell(10.0), "ray_train_ddp": cell(10.0)},
    }  # fmt: skip
    rows = {g["rate"]: g for g in bw.goals({"summary": {"2x2": summary}})}
    assert set(rows) == {"100mbit", "30mbit", "none"}  # 1 Gbit/s has no goal
    fast = rows["100mbit"]
    assert fast["lsgd"] == "lsgd_reference (center)" and fast["over_ddp"] == "0.40"  # not our faster LSGD
    assert fast["fastest_other"] == "local_sgd" and fast["over_fastest"] == "0.80"  # plain is left out
    assert fast["met"] is True
    slow = rows["30mbit"]
    assert slow["over_ddp"] == "<= 0.27" and slow["over_fastest"] == "1.33" and slow["met"] is False
    assert rows["none"]["over_ddp"] == ">= 15.00" and rows["none"]["met"] is False
    text = bw.goals_table(list(rows.values()))
    assert "| 100mbit | lsgd_reference (center) | 0.40 | <= 0.5 and < 1 | local_sgd | 0.80 | yes |" in text

    def met(ours, ddp, rate="30mbit"):
        cells = {"lsgd (center)": ours, "ray_train_ddp": ddp}
        return bw.goals({"summary": {"2x2": {rate: cells}}})[0]["met"]

    assert met(cell(40.0), cell(100.0, True)) is None  # DDP >= 100 s: 0.4x or less, maybe not 0.3x
    assert met(cell(40.0), cell(200.0, True)) is True  # at most 0.2x, below DDP too
    assert met(cell(20.0, True), cell(100.0), "none") is None  # at least 0.2x: maybe within 1.25x
    assert met(cell(200.0, True), cell(100.0, True)) is None  # two bounds decide nothing
    assert met(cell(10.0), cell(40.0)) is True  # our LSGD stands in when the report has no reference runs


def test_the_bandwidth_median_counts_a_run_that_missed_the_target_as_slower():
    """A run that never reached the target is slower than how long it trained: it takes its place
    in the median (a censored median) instead of being left out, which would flatter a contender
    that reached the target on some seeds only."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_bandwidth as bw

    exact = bw.censored_spread([50.0, 60.0], [300.0])
    assert exact == {"median": 60.0, "censored": False, "min": 50.0, "max": 60.0, "n": 2}
    assert bw.censored_spread([50.0], [300.0, 300.0])["median"] == 300.0  # not 50: most runs missed
    half = bw.censored_spread([205.8], [300.0])
    assert half["median"] == (205.8 + 300.0) / 2 and half["censored"] and half["n"] == 1
    early = bw.censored_spread([50.0, 60.0, 70.0], [55.0])  # a leader that had not reached it at 55 s
    assert early["median"] == 57.5 and early["censored"]  # it may yet pass 60 s: only a bound
    assert bw.censored_spread([], []) is None
    none = bw.censored_spread([], [300.0])
    assert none["censored"] and none["n"] == 0 and none["min"] is None and bw.fmt(none) == ">= 300.0 s (none reached)"
    assert bw.fmt(half) == ">= 252.9 s (205.8-205.8, n=1)"

    def run(seed, t):
        return {"layout": "2x2", "rate": "30mbit", "contender": "ray_train_ddp", "seed": seed, "time_to_target_s": t,
                "samples_to_target": t and int(t * 10), "samples": 3000, "train_s": 300.0, "wall_s": 320.0,
                "samples_per_s": 10.0, "link_bytes_per_worker_step": 4e5}  # fmt: skip

    ddp = bw.summarize({"runs": [run(0, 205.8), run(1, None), run(2, None)]})["2x2"]["30mbit"]["ray_train_ddp"]
    assert ddp["time_to_target_s"]["median"] == 300.0 and ddp["time_to_target_s"]["censored"]
    assert ddp["samples_to_target"]["median"] == 3000 and ddp["samples_to_target"]["censored"]
    assert ddp["reached"] == 1 and ddp["runs"] == 3


def test_the_bandwidth_summary_gives_lsgds_samples_to_target_to_its_center_not_its_leader():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_bandwidth as bw

    run = {"layout": "2x2", "rate": "30mbit", "contender": "lsgd", "seed": 0, "time_to_target_s": 50.0, "train_s": 65.0,
           "center_time_to_target_s": 50.0, "leader_time_to_target_s": 65.0, "samples_to_target": 1024,
           "wall_s": 90.0, "samples_per_s": 20.0, "link_bytes_per_worker_step": 3e4}  # fmt: skip
    cells = bw.summarize({"runs": [run]})["2x2"]["30mbit"]
    assert cells["lsgd (center)"]["samples_to_target"]["median"] == 1024
    assert cells["lsgd (leader)"]["samples_to_target"] is None  # the run's samples are the center's
    assert cells["lsgd (leader)"]["time_to_target_s"]["median"] == 65.0


def test_the_bandwidth_report_of_a_missing_sweep_says_so(tmp_path):
    missing = tmp_path / "none.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_bandwidth.py"), "--report", "--out", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and f"no sweep at {missing}" in done.stderr and "Traceback" not in done.stderr


def test_under_load_runs_the_command_beside_spinning_processes_and_stops_them_however_it_ends():
    probe = 'for p in $LOAD_PIDS; do grep -q "^State:.R" /proc/$p/status && echo running $p; done; exit 3'
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "under_load.sh"), "sh", "-c", probe],
        env={**os.environ, "LOAD_SPINNERS": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    pids = [int(line.split()[1]) for line in done.stdout.splitlines()]
    assert done.returncode == 3 and len(pids) == 2, (done.stdout, done.stderr)  # the command's status
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], pids  # gone with the script
    refused = subprocess.run(["bash", str(ROOT / "scripts" / "under_load.sh")], capture_output=True, text=True)
    assert refused.returncode == 2 and "usage" in refused.stderr
