"""The chaos script: a short run with failures struck at random (every kind it knows) on a
multi-node ``Cluster``, as a user runs it; and how strikes are matched to the run's recoveries."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from lsgd_ray._internal.peer_server import EASGD
from lsgd_ray.algorithms.registry import ALGORITHMS
from lsgd_ray.results import FitResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import chaos  # noqa: E402


def test_each_strike_is_matched_to_a_recovery_of_its_own_kind_first_and_a_replacement_serves_one():
    strikes = [
        chaos.Strike("worker_kill", 10.0, "Worker pid 1"),
        chaos.Strike("worker_kill", 11.0, "Worker pid 2"),
        chaos.Strike("coordinator", 12.0, "GlobalLeader pid 3"),
        chaos.Strike("evaluator", 13.0, "Evaluator pid 4"),
        chaos.Strike("node", 30.0, "node abcd"),
        chaos.Strike("worker_kill", 40.0, "Worker pid 5"),
    ]
    events = [
        {"event": "worker_replaced", "rank": 0, "time": 9.0},  # before any strike: not a recovery
        {"event": "worker_replaced", "rank": 1, "time": 12.5},
        {"event": "coordinator_restarted", "time": 14.0, "steps_lost": 24},
        {"event": "worker_replaced", "rank": 2, "time": 15.0},
    ]
    rows = chaos.recoveries(strikes, events, evaluation_times=[5.0, 20.0], end=45.0, settle_s=10.0)
    assert [(r["kind"], r["recovered_by"], r["open_at_end"]) for r in rows] == [
        ("worker_kill", "worker_replaced", False),
        ("worker_kill", "worker_replaced", False),  # its own kind first: the restart is the coordinator's
        ("coordinator", "coordinator_restarted", False),
        ("evaluator", "evaluation", False),
        ("node", None, False),  # nothing after it, long before the end
        ("worker_kill", None, True),  # in the run's last 10 s: nothing needed it before the end
    ]
    assert rows[0]["recovery_s"] == 2.5 and rows[1]["recovery_s"] == 4.0 and rows[3]["recovery_s"] is None
    # without an event of its own kind, a strike takes another that recovers it too
    late = chaos.recoveries(strikes[:1], [{"event": "coordinator_restarted", "time": 11.0}], [])
    assert late[0]["recovered_by"] == "coordinator_restarted" and not late[0]["open_at_end"]
    summary = chaos.summarize({"status": "completed", "strikes": rows, "store": [(0, 1.0, 2), (1, 3.0, 4)]})
    assert summary["injected"] == 6 and summary["recovered"] == 4 and summary["open_at_end"] == 1
    assert summary["kinds"]["worker_kill"] == {
        "injected": 3,
        "recovered": 2,
        "open_at_end": 1,
        "recovery_s_median": 3.25,
        "recovery_s_max": 4.0,
        "steps_lost_mean": None,  # a replaced worker's events carry no figure
        "steps_lost_max": None,
    }
    assert summary["kinds"]["coordinator"]["steps_lost_mean"] == 24
    assert summary["store_mib_first_last_max"] == [1.0, 3.0, 3.0]
    aborted = chaos.summarize({"status": "aborted", "strikes": rows})
    assert aborted["recovered"] == 0  # an aborted run survived nothing


def test_a_strike_that_names_its_workers_is_recovered_only_by_an_event_about_them():
    """A worker's strike is matched to its own rank's replacement, not to the next replacement
    of another worker; a group re-formed, or a coordinator restarted, recovers every worker
    strike it covers."""
    strikes = [
        chaos.Strike("worker_kill", 10.0, "Worker(rank=1, group=0) pid 1", ranks=(1,)),
        chaos.Strike("worker_kill", 11.0, "Worker(rank=2, group=1) pid 2", ranks=(2,)),
        chaos.Strike("local_leader", 20.0, "LocalLeader(group=1) pid 3", ranks=(2, 3)),
        chaos.Strike("worker_stop", 20.5, "Worker(rank=3, group=1) pid 4", ranks=(3,)),
        chaos.Strike("node", 30.0, "node abcd", ranks=(0, 1)),
        chaos.Strike("coordinator", 50.0, "GlobalLeader pid 5"),
        chaos.Strike("coordinator", 51.0, "GlobalLeader pid 6"),
        chaos.Strike("worker_kill", 52.0, "Worker(rank=0, group=0) pid 7", ranks=(0,)),
        chaos.Strike("evaluator", 60.0, "Evaluator pid 8"),
    ]
    events = [
        {"event": "worker_replaced", "rank": 2, "time": 12.0},
        {"event": "worker_replaced", "rank": 1, "time": 13.0},
        {"event": "group_replaced", "ranks": [0, 1], "time": 21.0},  # the other group
        {"event": "group_replaced", "ranks": [2, 3], "time": 22.0},
        {"event": "group_dropped", "ranks": [0, 1], "time": 31.0},  # a drop is not a recovery
        {"event": "group_rejoined", "ranks": [0, 1], "time": 40.0},
        {"event": "coordinator_restarted", "time": 53.0, "steps_lost": 8},
        {"event": "evaluator_replaced", "time": 64.5},
    ]
    rows = chaos.recoveries(strikes, events, [])
    assert [(r["recovered_by"], r["recovery_s"]) for r in rows] == [
        ("worker_replaced", 3.0),  # rank 1's, not rank 2's a second earlier
        ("worker_replaced", 1.0),
        ("group_replaced", 2.0),
        ("group_replaced", 1.5),  # the same re-forming recovered the stopped worker of that group
        ("group_rejoined", 10.0),
        ("coordinator_restarted", 3.0),
        ("coordinator_restarted", 2.0),  # struck again while it was restarted: one restart ends both
        ("coordinator_restarted", 1.0),  # and recovers every worker
        ("evaluator_replaced", 4.5),
    ]
    assert rows[0]["ranks"] == [1] and rows[5]["ranks"] == []
    # a worker's strike recovered by a restart does not take it from the coordinator's strike
    shared = chaos.recoveries(
        [chaos.Strike("worker_kill", 45.0, "Worker pid 8", ranks=(1,)), chaos.Strike("coordinator", 50.0, "pid 9")],
        [{"event": "coordinator_restarted", "time": 53.0}],
        [],
    )
    assert [(r["recovered_by"], r["recovery_s"]) for r in shared] == [
        ("coordinator_restarted", 8.0),
        ("coordinator_restarted", 3.0),
    ]


def test_a_saved_report_is_matched_again_by_the_current_rules(tmp_path):
    """``--rematch``: the strikes of a saved report matched again to its events, the summary
    and table made again; an evaluator's match is kept (the report has no evaluation times)."""
    strike = {"victim": "v", "recovered_by": None, "recovery_s": None, "steps_lost": None, "open_at_end": False}
    report = {
        "runs": [
            {
                "algorithm": "lsgd",
                "status": "completed",
                "strikes": [
                    {**strike, "kind": "worker_kill", "time": 10.0, "ranks": [1], "recovered_by": "worker_replaced",
                     "recovery_s": 1.0},  # matched by older rules to rank 0's replacement
                    {**strike, "kind": "evaluator", "time": 11.0, "ranks": [], "recovered_by": "evaluation"},
                    {**strike, "kind": "worker_kill", "time": 12.0, "ranks": [2], "open_at_end": True},
                ],
                "events": [
                    {"event": "worker_replaced", "rank": 0, "time": 11.0},
                    {"event": "worker_replaced", "rank": 1, "time": 14.0},
                ],
            }
        ]
    }  # fmt: skip
    saved, out = tmp_path / "chaos.json", tmp_path / "again.json"
    saved.write_text(json.dumps(report))
    command = [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--rematch", str(saved), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert [(r["recovered_by"], r["recovery_s"], r["open_at_end"]) for r in run["strikes"]] == [
        ("worker_replaced", 4.0, False),
        ("evaluation", None, False),
        (None, None, True),
    ]
    assert run["summary"]["recovered"] == 2 and run["summary"]["open_at_end"] == 1
    assert "2 of 3 injected failures recovered, 1 open when the run ended" in done.stdout
    # a file that is not a report: one line naming it, no traceback
    (tmp_path / "not.json").write_text("{")
    for bad in ("missing.json", "not.json"):
        command[3] = str(tmp_path / bad)
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and f"--rematch {tmp_path / bad}: not a chaos report" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_server_strike_is_recovered_by_the_servers_replacement_or_a_coordinator_restart():
    strikes = [
        chaos.Strike("server", 10.0, "ParameterServer pid 7"),
        chaos.Strike("server", 20.0, "ParameterServer pid 8"),
    ]
    events = [{"event": "server_replaced", "time": 11.0}, {"event": "coordinator_restarted", "time": 23.0}]
    rows = chaos.recoveries(strikes, events, [])
    assert [(r["recovered_by"], r["recovery_s"]) for r in rows] == [
        ("server_replaced", 1.0),
        ("coordinator_restarted", 3.0),
    ]
    # a coordinator restarted before the server's replacement started a new server itself: the
    # strike ends there, and the replacement after it is the next strike's (an EASGD run's
    # matching took the replacement first, and every later server strike was matched late)
    strikes = [
        chaos.Strike("server", 10.0, "ParameterServer pid 7"),
        chaos.Strike("server", 30.0, "ParameterServer pid 8"),
    ]
    events = [{"event": "coordinator_restarted", "time": 12.0}, {"event": "server_replaced", "time": 31.0}]
    rows = chaos.recoveries(strikes, events, [])
    assert [(r["recovered_by"], r["recovery_s"]) for r in rows] == [
        ("coordinator_restarted", 2.0),
        ("server_replaced", 1.0),
    ]
    hung = chaos.Strike("server_stop", 30.0, "ParameterServer pid 9")  # found silent, killed, replaced
    (row,) = chaos.recoveries([hung], [{"event": "server_replaced", "time": 45.5}], [])
    assert (row["recovered_by"], row["recovery_s"]) == ("server_replaced", 15.5)
    # every algorithm with a ParameterServer, and no other, is struck with "server" and "server_stop"
    served = {name for name, a in ALGORITHMS.items() if issubclass(a.coordinator_class(), EASGD)}
    assert served == chaos.SERVED and set(chaos.SERVER_KINDS) == {"server", "server_stop"} <= set(chaos.KINDS)
    assert "server_stop" in chaos.STOPS  # SIGSTOPped, and SIGCONTed after the run if it outlived it


def test_the_chaos_runs_cover_every_algorithm_and_the_variants_with_recovery_state_of_their_own(tmp_path):
    """Every algorithm has a run; Streaming DiLoCo and PowerSGD data-parallel have their own, as
    their fragment schedule and error feedback are state a recovery must carry."""
    import argparse

    args = argparse.Namespace(nodes=2, workers_per_node=1, eval_every=10.0, actor_timeout=5.0, checkpoint_every=10.0,
                              seed=8)  # fmt: skip
    configs = {name: chaos.config_for(name, args, str(tmp_path), time_budget_s=60.0) for name in chaos.RUNS}
    assert {c.algorithm for c in configs.values()} == set(ALGORITHMS)
    assert configs["diloco_streaming"].diloco.fragments == 4 and configs["diloco"].diloco.fragments == 1
    assert configs["data_parallel_powersgd"].data_parallel.compression == "powersgd"
    assert configs["data_parallel"].data_parallel.compression == "none"


def test_a_process_is_named_by_its_pid_and_start_so_a_reused_pid_is_not_taken_for_it():
    """A data-parallel chaos run reported an evaluator it had killed as left running: its pid
    had been given to a new process by then."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = chaos.started(child.pid)
        assert start is not None and chaos.same_process(child.pid, start)
        assert not chaos.same_process(child.pid, start - 1)  # another process under the same pid
    finally:
        child.kill()
        child.wait()
    assert chaos.started(child.pid) is None and not chaos.same_process(child.pid, start)


def test_a_run_that_survived_every_strike_but_made_no_step_is_reported_stalled():
    def result(steps, status="completed", evaluated_at=()):
        history = [{"step": step} for step in evaluated_at]
        return FitResult("out", status, "dpsgd", "average of the workers", 0.13, 2.3, -1, steps, 0, history)

    assert chaos.outcome(result(0, evaluated_at=[0, 0])) == ("stalled", "no worker made a step in the run's budget")
    assert chaos.outcome(result(96)) == ("completed", None)
    assert chaos.outcome(result(0, evaluated_at=[0, 48])) == ("completed", None)  # no worker answered at the end
    assert chaos.outcome(result(0, "diverged")) == ("diverged", None)
    report = {"runs": [{"algorithm": "dpsgd", "summary": chaos.summarize({"status": "stalled", "strikes": []})}]}
    assert chaos.table(report).endswith("0 run abort(s), 1 run(s) with no step")


@pytest.mark.timeout(120)
def test_the_undisturbed_run_waits_until_the_nodes_the_killer_removed_are_listed_dead():
    """A CI chaos run failed to place its undisturbed run: a node the killer had removed was
    still listed alive (the GCS marks a node dead only after its health checks fail), so the
    plan put a worker on it, and its CPUs never became free."""
    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast}
    )
    try:
        victim = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        killer = chaos.Killer(cluster, "GlobalLeader", ("node",), 5.0, random.Random(0), 1, spare=False)
        cluster.remove_node(victim, allow_graceful=False)
        killer.strikes.append(chaos.Strike("node", time.time(), "node", None, victim.node_id))
        assert killer.wait_for_removed_nodes(timeout_s=60) == []
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        assert alive[victim.node_id] is False and sum(alive.values()) == 2, alive  # the head and the other
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_fresh_node_that_does_not_start_in_time_is_tried_again():
    """A DiLoCo chaos run's killer died when Ray's ``add_node`` timed out during start-up on an
    overloaded machine. The node is tried again ``spare_delay_s`` later, and the retry reported."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        killer = chaos.Killer(cluster, "GlobalLeader", ("node",), 5.0, random.Random(0), 1, spare=True)
        real, calls = cluster.add_node, []

        def fails_first(**kw):
            calls.append(kw)
            if len(calls) == 1:
                raise Exception("The current node timed out during startup.")
            return real(**kw)

        cluster.add_node = fails_first
        killer.spare_delay_s = 0.0
        killer.spares_due = [time.monotonic()]
        killer.join_due_spare()
        assert len(killer.spares_due) == 1 and killer.node_start_retries == [
            "Exception: The current node timed out during startup."
        ]
        killer.join_due_spare()
        assert killer.spares_due == [] and len(calls) == 2
        assert len(cluster.worker_nodes) == 1  # the second try started it
    finally:
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_chaos_run_survives_every_strike_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "chaos.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "chaos.py"), "--algorithms", "lsgd", "--minutes", "0.75",
        "--mtbf", "6", "--nodes", "2", "--workers-per-node", "1", "--actor-timeout", "5", "--checkpoint-every", "5",
        "--eval-every", "5", "--seed", "98", "--out", str(out), "--tmp", str(tmp_path / "tmp"),
    ]  # fmt: skip
    # seed 98 draws each of the five kinds once in its first five strikes (187 did, with the
    # evaluator's, before the evaluator became the driver's); seed 1 at a 4 s mtbf drew
    # 34 (strikes go on while the coordinator restarts, outside the budget) for no kind more. 45 s
    # of training, not 30: with one core busy 30 s drew 5 strikes, too near the 4 asked for.
    # Figures, and why both cores busy still fail: docs/changelog.md, seventeenth session
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=560, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    summary = run["summary"]
    # every strike survived: the run went on to its budget. "diverged" is allowed: when every
    # worker is lost at once a group restarts from weights that may score at chance for one
    # evaluation, which the divergence watch reports (the final accuracy is checked below)
    assert summary["status"] in ("completed", "diverged") and not run["killer_errors"], run.get("error")
    assert summary["injected"] >= 4, run["strikes"]
    # the killer read from Ray's actor table which workers it struck
    named = [r for r in run["strikes"] if r["kind"] in ("worker_kill", "worker_stop")]
    assert all(r["ranks"] for r in named), named
    # matched to a recovery event: not all (a recovery reported to a coordinator that then died is
    # not in the run's events: docs/fault-tolerance.md, "Chaos runs"), but some
    assert summary["recovered"] > 0, run["strikes"]
    restarts = [r for r in run["strikes"] if r["recovered_by"] == "coordinator_restarted"]
    assert all(isinstance(r["steps_lost"], int) and r["steps_lost"] >= 0 for r in restarts), restarts
    assert summary["processes_left"] == 0, run["actor_processes_left"]
    assert summary["accuracy"] > 0.5 and summary["undisturbed_accuracy"] > 0.5, summary  # chance: 0.1
    assert "injected failures recovered" in done.stdout
