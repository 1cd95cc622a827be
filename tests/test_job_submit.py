"""`scripts/submit.sh` as a user runs it: a real `ray start` head node, an experiment through `ray job submit`.

The head node is this test's own: bound to loopback, its own ports and temp dir. Other Ray clusters
may run on the same machine, so the teardown never calls `ray stop` (which stops every cluster of
the user): it ends exactly the processes of this cluster, found by the session `ray start` ran in,
by the temp dir in their command line, or by a working directory inside it (the job's driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment lsgd-ray is installed in (.venv/bin)
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray") or "ray"
CHANCE = 0.1  # ten digit classes


@dataclass
class Head:
    temp_dir: str
    dashboard: str  # the job server's address
    env: dict[str, str]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)  # nothing may point at another cluster
    # No token authentication, for `ray start` and for the job client alike (see README).
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    # As if the environment were activated: the job's `python` is the one on the head node's PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _cluster_processes(temp_dir: str, session_id: int) -> dict[int, str]:
    """Live processes of this test's cluster: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):  # already dead, waiting for its parent to reap it
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            sid = os.getsid(pid)
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = ""
        except (OSError, IndexError):
            continue  # gone meanwhile
        if sid == session_id or re.search(re.escape(temp_dir) + r"(/|\s|$)", command) or cwd.startswith(temp_dir + "/"):
            found[pid] = command.strip()
    return found


def _stop_cluster(temp_dir: str, session_id: int) -> dict[int, str]:
    """SIGTERM, then SIGKILL, the cluster's processes; returns those still alive (none, normally)."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + grace_s
        while (pids := _cluster_processes(temp_dir, session_id)) and time.monotonic() < deadline:
            for pid in pids:  # again each pass: a raylet may start workers until it is gone
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.5)
        if not pids:
            return {}
    return _cluster_processes(temp_dir, session_id)


def _run_in_own_group(command: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout (or an interrupted test) also ends the command's children."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _wait_for_dashboard(url: str, timeout_s: float) -> None:
    """The job server lives in the dashboard, which can take 10-20 s to answer on a busy machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard at {url} did not answer within {timeout_s:.0f}s")
        time.sleep(1.0)


@pytest.fixture
def ray_head(tmp_path):
    # A short path: Ray's unix sockets live under it (108-byte limit on socket paths).
    temp_dir = tempfile.mkdtemp(prefix="lsgdjob-", dir="/tmp")
    gcs, dashboard, client, agent_http, env_agent, metrics = _free_ports(6)
    env = _cluster_env()
    command = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=8",
        f"--temp-dir={temp_dir}",
        # Every fixed default port too: other clusters on this machine may hold 10001 or 52365.
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]
    log_path = tmp_path / "ray_start.log"
    with open(log_path, "w") as log:
        # Its own session: every daemon `ray start` leaves behind keeps this session id.
        start = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    session_id = start.pid
    try:
        code = start.wait(timeout=180)
        assert code == 0, f"ray start failed ({code}):\n{log_path.read_text()[-3000:]}"
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(url, timeout_s=180)
        yield Head(temp_dir=temp_dir, dashboard=url, env=env)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        left = _stop_cluster(temp_dir, session_id)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {left}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_script_runs_an_experiment_as_a_ray_job(ray_head, tmp_path):
    results = tmp_path / "results"
    submission_id = f"lsgd-test-{os.getpid()}-{int(time.time())}"
    proc = _run_in_own_group(
        [
            "bash",
            str(ROOT / "scripts" / "submit.sh"),
            "--address",
            ray_head.dashboard,
            "--results",
            str(results),
            "--submission-id",
            submission_id,
            "--",
            "python",
            "-m",
            "lsgd_ray",
            "train",
            "--address",
            "auto",
            "--dataset",
            "digits",
            "--groups",
            "2",
            "--workers-per-group",
            "1",
            "--max-steps",
            "60",
            "--quiet",
            "--output-dir",
            "{results}",
        ],
        timeout_s=480,
        cwd=tmp_path,  # the script finds the repository itself
        env=ray_head.env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]

    # The script's report, after the job's own output (streamed by `ray job submit`).
    assert f"submission id: {submission_id}" in proc.stdout
    assert "status:        SUCCEEDED" in proc.stdout
    assert f"results:       {results}" in proc.stdout
    assert "lsgd-ray: done (lsgd)" in proc.stdout and f"{results}/result.json" in proc.stdout

    status = subprocess.run(
        [RAY, "job", "status", "--address", ray_head.dashboard, submission_id],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr

    # The driver (`--address auto`) joined this cluster instead of starting a Ray of its own.
    with urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/{submission_id}", timeout=120) as response:
        job = json.load(response)
    assert job["status"] == "SUCCEEDED" and job["driver_info"], job

    # The uploaded working directory: the package, without the excluded directories.
    files = Path(ray_head.temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
    packages = [p for p in files if p.is_dir()]
    assert packages, "no uploaded working directory in the session"
    for package in packages:
        assert (package / "lsgd_ray" / "cli.py").exists()
        excluded = (".venv", "runs", ".git", "notebooks", "experiments/results")
        assert not [name for name in excluded if (package / name).exists()], package

    log = (results / "job.log").read_text()
    assert "lsgd-ray: done (lsgd)" in log and "test accuracy" in log
    result = json.loads((results / "result.json").read_text())
    assert result["status"] == "completed", result.get("error")
    assert result["final_test_accuracy"] > CHANCE + 0.3, result["final_test_accuracy"]
    assert (results / "leader_state_dict.pt").exists()
