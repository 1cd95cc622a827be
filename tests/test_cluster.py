"""The emulated cluster: real network namespaces, veth links shaped with tc, one Ray node each.

The tests that need namespaces skip (with the reason) where they cannot be made, unless
LSGD_RAY_REQUIRE_NETNS is set, as `.ci/run` does: CI runs as root and can make them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsgd_ray import cluster as emu
from lsgd_ray import netns
from lsgd_ray.cli import main
from lsgd_ray.cluster import ClusterError, ClusterSpec, EmulatedCluster, parse_rate

NAME = f"t{os.getpid() % 10**6}"  # this run's own namespaces: t123-sw, t123-n0, ...


# ---------------------------------------------------------------------- without namespaces


@pytest.mark.parametrize(
    "text,bits",
    [("100mbit", 10**8), ("1gbit", 10**9), ("30mbit", 3 * 10**7), ("2.5mbit", 2_500_000), ("none", None)],
)
def test_link_rates_are_read_in_tc_units(text, bits):
    assert parse_rate(text) == bits
    if bits:
        assert parse_rate(emu.format_rate(bits)) == bits


@pytest.mark.parametrize("text", ["100", "100mbps", "fast", "-1mbit", "1kbit"])
def test_a_bad_link_rate_is_refused_in_one_line(text):
    with pytest.raises(ClusterError, match="link rate") as info:
        parse_rate(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"nodes": 0}, "nodes"),
        ({"cpus_per_node": 0}, "cpus_per_node"),
        ({"name": "Has-Dash"}, "cluster name"),
        ({"name": "muchtoolongname"}, "cluster name"),
        ({"object_store_mb": 10}, "object_store_mb"),
        ({"link": "10gb"}, "link rate"),
    ],
)
def test_a_bad_cluster_spec_is_refused_before_anything_is_made(kwargs, field):
    with pytest.raises(ClusterError, match=field):
        ClusterSpec(**kwargs)


def test_the_tbf_bucket_holds_two_milliseconds_of_the_rate_and_at_least_one_segment():
    assert emu.tbf_burst_bytes(10**9) == 250_000
    assert emu.tbf_burst_bytes(10**8) == 64 * 1024


def test_nodes_get_addresses_of_one_private_subnet_and_their_own_ray_temp_dir():
    spec = ClusterSpec(nodes=3, name="abc")
    assert [spec.address(i) for i in range(3)] == [f"{emu.SUBNET}.{i}" for i in (1, 2, 3)]
    assert emu.SUBNET.startswith("10.")
    assert len({spec.temp_dir(i) for i in range(3)}) == 3
    assert all(not d.startswith("/tmp/ray") for d in map(spec.temp_dir, range(3)))
    env = emu.node_env(spec, {"PATH": "/usr/bin"})
    assert env["RAY_ADDRESS"] == f"{emu.SUBNET}.1:6379" and env["GLOO_SOCKET_IFNAME"] == emu.NODE_IFACE


def test_without_root_the_message_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_has_cap_net_admin", lambda: False)
    with pytest.raises(ClusterError, match="root or CAP_NET_ADMIN"):
        emu.check_prerequisites()
    monkeypatch.setattr(emu.shutil, "which", lambda tool: None)
    with pytest.raises(ClusterError, match="ip and tc not found: install iproute2"):
        emu.check_prerequisites()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["cluster", "up", "--link", "fast"], "link rate 'fast' not understood"),
        (["cluster", "up", "--nodes", "0"], "nodes must be"),
        (["cluster", "status", "--name", "nosuch"], "no emulated cluster 'nosuch' is up"),
        (["cluster", "run", "--name", "nosuch", "--", "true"], "no emulated cluster 'nosuch' is up"),
    ],
)
def test_cluster_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---------------------------------------------------------------------- with namespaces


def _namespaces_or_skip() -> None:
    """Skip (or, where LSGD_RAY_REQUIRE_NETNS is set, fail) when namespaces cannot be made here."""
    try:
        emu.check_prerequisites()
        probe = f"{NAME}-probe"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            raise ClusterError(f"ip netns add failed: {made.stderr.strip()}")
        subprocess.run(["ip", "netns", "del", probe], check=True)
    except ClusterError as exc:
        if os.environ.get("LSGD_RAY_REQUIRE_NETNS"):
            pytest.fail(f"LSGD_RAY_REQUIRE_NETNS is set but network namespaces cannot be made: {exc}")
        pytest.skip(f"network namespaces cannot be made here: {exc}")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lsgd_ray", "cluster", *argv, "--name", NAME]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def shaped():
    """Two nodes of 2 CPUs at 100 Mbit/s, brought up with the CLI (after a stale namespace of
    the same name, as a crashed run leaves, which `up` must clean away first)."""
    _namespaces_or_skip()
    subprocess.run(["ip", "netns", "add", f"{NAME}-n7"], check=True)
    try:
        up = _cli("up", "--nodes", "2", "--cpus-per-node", "2", "--link", "100mbit", "--object-store-mb", "256")
        assert up.returncode == 0, up.stderr
        assert f"{NAME}-n7" not in emu.namespaces_of(NAME)
        again = _cli("up", "--nodes", "2")  # a running cluster is not taken down by a second `up`
        assert again.returncode == 2 and "already up" in again.stderr
        yield EmulatedCluster.attach(NAME)
    finally:
        EmulatedCluster(name=NAME).down()


def _probe(cluster: EmulatedCluster) -> dict:
    done = cluster.run([sys.executable, "-m", "lsgd_ray.cluster_probe"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.timeout(400)
def test_links_are_shaped_at_the_set_rate_and_unshaped_at_none(shaped):
    rate = 100e6
    slow = _probe(shaped)
    assert slow["from"] != slow["to"] and slow["gloo_ifname"] == emu.NODE_IFACE
    # a 24 MB Ray object from node 1 to node 0 at 85-105% of the rate
    assert 0.85 * rate <= slow["object_mbit_s"] * 1e6 <= 1.05 * rate, slow
    # a 1 MiB gloo all-reduce of 2 ranks in the ring formula's time, within 20%: the formula's
    # bytes as the shaper counts them, with each segment's headers (4.6% at MTU 1500)
    assert slow["allreduce_wire_bits"] == pytest.approx(slow["allreduce_ring_bits"] * 1514 / 1448)
    ring_s = slow["allreduce_wire_bits"] / rate
    assert abs(slow["allreduce_s"] - ring_s) <= 0.2 * ring_s, (slow, ring_s)
    status = json.loads(_cli("status", "--json").stdout)
    assert [n["link"] for n in status["nodes"]] == ["100Mbit", "100Mbit"]
    # node 1 sent at least the objects it served (3 x 24 MB), node 0 received them
    assert status["nodes"][1]["tx"] >= 3 * slow["object_bytes"] and status["nodes"][0]["rx"] >= 3 * slow["object_bytes"]

    assert _cli("link", "none").returncode == 0
    try:
        fast = _probe(shaped)
    finally:
        shaped.set_link("100mbit")
    assert fast["object_mbit_s"] >= 10 * slow["object_mbit_s"], (fast, slow)
    assert fast["allreduce_s"] * 10 <= slow["allreduce_s"], (fast, slow)


# A driver that starts a run's actors, prints where they are, and waits for a line on stdin.
_PLACE_AND_WAIT = """
import json, sys
from lsgd_ray.cli import build_parser, config_from_args
from lsgd_ray.data import dataset_factory, dataset_spec
from lsgd_ray.models import model_factory
from lsgd_ray.trainer import Trainer
argv = ["train", "--groups", "0", "--workers-per-group", "0", "--address", "auto", "--output-dir", sys.argv[1]]
args = build_parser().parse_args(argv + ["--quiet"])
spec = dataset_spec("digits", None)
model = model_factory("mlp", spec.model_input_shape(None), spec.num_classes)
trainer = Trainer(model, dataset_factory("digits", None), config_from_args(args))
trainer.start()
print(json.dumps(trainer.group_infos), flush=True)
sys.stdin.readline()
trainer.shutdown()
"""


@pytest.mark.timeout(300)
def test_each_local_leader_and_its_workers_run_in_their_own_nodes_namespace(shaped, tmp_path):
    driver = shaped.run(
        [sys.executable, "-c", _PLACE_AND_WAIT, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, background=True,
    )  # fmt: skip
    try:
        groups = json.loads(driver.stdout.readline())
        namespace_of = {shaped.spec.address(i): shaped.spec.namespace(i) for i in range(shaped.spec.nodes)}
        assert sorted(g["node_ip"] for g in groups) == sorted(namespace_of)  # one group per node
        for group in groups:
            pids = set(emu.namespace_pids(namespace_of[group["node_ip"]]))
            assert group["pid"] in pids  # the LocalLeader's process lives in its node's namespace
            assert len(group["workers"]) == shaped.spec.cpus_per_node
            for worker in group["workers"]:
                assert worker["node_ip"] == group["node_ip"] and worker["pid"] in pids
    finally:
        driver.communicate("\n", timeout=60)
    assert driver.returncode == 0


def test_down_leaves_nothing_behind(shaped):
    # last in the module: the fixture's cluster is taken down here and checked
    names = emu.namespaces_of(NAME)
    assert sorted(names) == sorted([f"{NAME}-sw", f"{NAME}-n0", f"{NAME}-n1"])
    pids = {p for ns in names for p in emu.namespace_pids(ns)}
    assert pids
    down = _cli("down")
    assert down.returncode == 0, down.stderr
    assert emu.namespaces_of(NAME) == []
    assert not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids)
    assert not os.path.exists(shaped.spec.state_dir)
    current = Path("/tmp/ray/ray_current_cluster")  # a later plain ray.init() must not find ours
    assert not current.exists() or emu.SUBNET not in current.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(420)
def test_bench_bandwidth_measures_contenders_across_a_shaped_link_and_goes_on_in_pieces(tmp_path):
    _namespaces_or_skip()
    out = tmp_path / "bw.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_bandwidth.py"
    command = [
        sys.executable, str(script), "--layouts", "2x1", "--rates", "30mbit", "--seeds", "0",
        "--contenders", "lsgd", "data_parallel", "--time-budget", "6", "--eval-every", "1", "--target", "0.5",
        "--batch", "32", "--out", str(out), "--tmp", str(tmp_path / "tmp"), "--cluster-name", f"{NAME}b",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["contender"]: r for r in report["runs"]}
    assert set(runs) == {"lsgd", "data_parallel"} and not any("error" in r for r in runs.values()), runs
    for run in runs.values():
        assert run["time_to_target_s"] is not None and run["worker_steps"] > 0, run
        sent = [node["tx"] for node in run["link_bytes"]]
        assert min(sent) > 0, run["link_bytes"]  # both nodes used their link
    # data-parallel all-reduces every step, LSGD moves a leader every 16 steps: fewer bytes per step
    assert runs["lsgd"]["link_bytes_per_worker_step"] < runs["data_parallel"]["link_bytes_per_worker_step"]
    assert (
        "leader_time_to_target_s" in runs["lsgd"]
        and runs["lsgd"]["center_time_to_target_s"] == runs["lsgd"]["time_to_target_s"]
    )
    assert "| 30mbit | data_parallel |" in done.stdout and (tmp_path / "bw.png").exists()
    assert emu.namespaces_of(f"{NAME}b") == []  # its cluster is gone
    # a second call finds the runs done and runs nothing again
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 run(s) to do" in again.stdout, again.stderr[-2000:]
    assert len(json.loads(out.read_text())["runs"]) == 2


@pytest.mark.timeout(600)
def test_async_lsgd_goes_on_while_a_nodes_link_crawls_then_is_cut_and_comes_back(tmp_path):
    """scripts/chaos_network.py, short: the other group keeps training through both faults, the
    cut node's group trains again after its link is back (re-joined on its restarted Ray node
    if the head declared it dead), and the run completes; nothing of the cluster is left."""
    _namespaces_or_skip()
    out = tmp_path / "net.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "chaos_network.py"
    command = [
        sys.executable, str(script), "--modes", "async", "--nodes", "2", "--calm", "6", "--slow", "10",
        "--cut", "12", "--after", "40", "--actor-timeout", "5", "--out", str(out), "--tmp", str(tmp_path / "tmp"),
        "--name", f"{NAME}c",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["status"] == "completed", run.get("traceback") or run.get("error")
    (victim,) = map(str, run["victim_groups"])
    healthy = "1" if victim == "0" else "0"
    rates = run["rates"]
    assert [f["phase"] for f in run["faults"]][:4] == ["slow", "calm again", "cut", "after"], run["faults"]
    for phase in ("calm", "slow", "cut"):  # the group on the healthy node never stalls
        assert rates[phase][healthy] and rates[phase][healthy] > 0, rates
    assert rates["after"][victim] and rates["after"][victim] > 0, rates  # the cut node's group trains again
    assert run["final_test_accuracy"] > 0.5, run
    assert emu.namespaces_of(f"{NAME}c") == []
