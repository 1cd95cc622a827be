"""Soak: 16 workers on 4 simulated nodes, asynchronous LSGD, thousands of rounds.

Outside the default suite: ``pytest -m soak tests/test_soak.py -s`` (``LSGD_SOAK_STEPS=128``
for a quick try). What it checks:

- no deadlock: the run ends within ``DEADLINE_S`` with every worker at ``max_steps``, and
  every round happened;
- object-store memory stays flat: sampled on every node all along the run; after the warm-up
  (the first 10% of the training time, while the pipeline fills), the last quarter is no higher
  than the first quarter by more than a few weight copies, the peak stays below half the stores
  and nothing is spilled, and when the run is over the stores are back to the copies of the last
  leader snapshot.
  (How many snapshots are in flight follows the scheduling lag: queued pulls pin theirs. The
  timeline printed with ``-s`` shows it beside the machine's load.);
- nothing is left behind: after ``Trainer.shutdown`` every actor of the run is DEAD and its
  process gone (only Ray's own idle pool workers remain); after the cluster's shutdown none of
  the cluster's processes remain.

A "round" is a **global pull** of the GlobalLeader: in asynchronous mode one is due each time
all n·l workers together have taken n·l·τ_G steps (``GlobalLeader.report``), the async
counterpart of a synchronous round ending in a global pull. It is sent
(``status()["global_pulls"]``) unless the last one's leader snapshot is still queued
(``global_pulls_skipped``): backpressure, like the LocalLeaders' leaving out a worker whose
previous pull has not run yet (``pulls_skipped``). With τ = τ_G = 1 that is one round per 16 worker-steps (and a local pull in each group
every 4 of its steps), so ``STEPS`` steps per worker make exactly ``STEPS`` rounds. Every
worker reports to its LocalLeader after every step and each report is relayed to the
GlobalLeader: the heaviest message rate LSGD produces.

The model is tiny to compute, but its weights (~115 KB) are above Ray's 100 KB inline limit,
so every leader snapshot really goes through the nodes' shared-memory object stores.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from lsgd_ray import LSGDConfig, TrainConfig, Trainer
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp

pytestmark = pytest.mark.soak

NODES, WORKERS_PER_NODE = 4, 4  # logical CPUs: this machine has 2 physical cores
WORKERS = NODES * WORKERS_PER_NODE
STEPS = int(os.environ.get("LSGD_SOAK_STEPS", "2048"))  # per worker; = rounds (global pulls)
DEADLINE_S = 1500.0  # training time beyond which the run counts as stuck
MODEL = functools.partial(mlp, (16,), 4, hidden=160)  # ~115 KB of weights: snapshots live in plasma
DATA = functools.partial(synthetic, n_train=2048, n_test=256)
STORE_BYTES = 128 << 20  # per node
SAMPLE_EVERY_S = 0.5
WARM_UP = 0.1  # fraction of the training time left out of the flatness comparison
# After the run the GlobalLeader still holds the last global pull's snapshot, and every node that
# read it may keep a copy (the head too: the coordinator and the driver's evaluator are there).
SETTLED_OBJECTS = NODES + 1


@pytest.mark.timeout(DEADLINE_S + 600)
def test_async_lsgd_soak_16_workers_on_4_nodes(tmp_path):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE_BYTES},
    )
    try:
        nodes = [cluster.add_node(num_cpus=WORKERS_PER_NODE, object_store_memory=STORE_BYTES) for _ in range(NODES)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        _soak(cluster, nodes, tmp_path)
    finally:
        ray.shutdown()
        everything = _cluster_processes(cluster)
        cluster.shutdown()
    gone_s = _wait_until(lambda: not _alive(everything), 30)
    print(f"soak: cluster shutdown: its {len(everything)} processes gone in {gone_s:.1f}s")
    assert not _alive(everything), f"processes left after the cluster's shutdown: {_alive(everything)}"


def _soak(cluster: Cluster, nodes, tmp_path) -> None:
    job = ray.get_runtime_context().get_job_id()
    baseline = _cluster_processes(cluster)
    cfg = TrainConfig(
        num_groups=NODES,
        workers_per_group=WORKERS_PER_NODE,
        batch_size=8,
        max_steps=STEPS,
        eval_every_s=10.0,
        lsgd=LSGDConfig(mode="async", tau=1, tau_global=1),
        actor_timeout_s=600.0,  # starting 22 torch processes on 2 cores takes minutes when others run too
        output_dir=str(tmp_path / "soak"),
        quiet=True,
    )
    sampler = StoreSampler(cluster.list_all_nodes())
    trainer = Trainer(MODEL, DATA, cfg, run_name="soak")
    try:
        trainer.start()
        assert sorted(g.node_id for g in trainer.topology.groups) == sorted(n.node_id for n in nodes)
        running = _cluster_processes(cluster)
        actor_pids = {a["Pid"] for a in _actors(job) if a["State"] == "ALIVE"}
        assert len(actor_pids) == WORKERS + NODES + 1  # workers, LocalLeaders, GlobalLeader
        assert {w["pid"] for g in trainer.group_infos for w in g["workers"]} <= actor_pids
        sampler.start()
        result = trainer.fit()  # a deadlock never returns: pytest-timeout ends the test
        duration = time.perf_counter() - sampler.begin
        # The last reports are fire and forget: let them reach the GlobalLeader.
        _wait_until(lambda: trainer.status()["total_steps"] >= WORKERS * STEPS, 30)
        status, stats = trainer.status(), trainer.worker_stats()
        sampler.stop()
        settle_s = _wait_until(lambda: _store_usage(cluster.list_all_nodes())[1] <= SETTLED_OBJECTS, 20)
        settled = _store_usage(cluster.list_all_nodes())
    finally:
        sampler.stop()
        trainer.shutdown()
    actor_processes = {pid: info for pid, info in running.items() if pid in actor_pids}
    dead_s = _wait_until(lambda: not _alive(actor_processes) and all(a["State"] == "DEAD" for a in _actors(job)), 60)
    after = _cluster_processes(cluster)
    new_after = collections.Counter(name for pid, (_, name) in after.items() if pid not in baseline)
    strays = {pid: info for pid, info in after.items() if pid not in baseline and info[1] != "ray::IDLE"}
    strays_doc = _describe(strays, running)
    not_dead = [f"{a['ActorClassName']} ({a['State']})" for a in _actors(job) if a["State"] != "DEAD"]

    samples = [s for s in sampler.samples if s[0] <= duration]
    first, middle, last = _quarter_means(samples, duration)
    mib, weights = 1 << 20, trainer.weight_bytes
    print(
        f"\nsoak: {status['global_pulls'] + status['global_pulls_skipped']} rounds: {status['global_pulls']} global "
        f"pulls sent, {status['global_pulls_skipped']} left out (backpressure); per-worker pulls left out: "
        f"{status['pulls_skipped']}; {status['total_steps']} worker-steps, "
        f"steps per worker {min(s['steps'] for s in stats)}..{max(s['steps'] for s in stats)}, "
        f"pulls per worker {min(s['pulls'] for s in stats)}..{max(s['pulls'] for s in stats)}, "
        f"{len(result.history)} evaluations, final test accuracy {result.final_test_accuracy:.3f}\n"
        f"soak: training {duration:.1f}s after a {trainer.startup_s:.1f}s start-up: "
        f"{WORKERS * STEPS / duration:,.0f} worker-steps/s, {STEPS / duration:.1f} rounds/s\n"
        f"soak: object store ({weights:,}-byte snapshots), {len(samples)} samples; mean of the first quarter / "
        f"middle half / last quarter after warm-up: {first[0] / mib:.2f} / {middle[0] / mib:.2f} / "
        f"{last[0] / mib:.2f} MiB, {first[1]:.1f} / {middle[1]:.1f} / {last[1]:.1f} objects; peak "
        f"{max(s[1] for s in samples) / mib:.2f} MiB, {max(s[2] for s in samples)} objects; "
        f"{settled[0] / mib:.2f} MiB, {settled[1]} objects {settle_s:.1f}s after the run; "
        f"sampling errors {len(sampler.errors)}\n"
        f"soak: timeline (tenths of the training time): {_timeline(samples, duration)}\n"
        f"soak: cluster processes: {len(baseline)} before the run, {len(running)} with its actors, "
        f"{len(after)} after Trainer.shutdown (new since before: {dict(new_after)}); "
        f"the run's {len(actor_processes)} actor processes gone {dead_s:.1f}s after shutdown"
        + (f"\nsoak: other new processes: {strays_doc}" if strays else "")
    )

    assert result.status == "completed", result.error
    assert duration < DEADLINE_S
    assert [s["steps"] for s in stats] == [STEPS] * WORKERS
    assert status["total_steps"] == WORKERS * STEPS
    assert status["global_pulls"] + status["global_pulls_skipped"] == STEPS  # one round per 16 worker-steps
    # backpressure thins the global pulls (to 12-29% of the rounds here), never stops them
    assert status["global_pulls"] >= STEPS // 20
    assert all(s["pulls"] > 0 for s in stats)
    assert len(samples) >= 20 and len(sampler.errors) <= len(samples) // 10, sampler.errors[:3]
    assert weights > 100 * 1024 and max(s[1] for s in samples) > 0  # snapshots went through plasma
    # Flat: in-flight snapshots plateau (how high depends on the machine's load); a leak grows.
    assert last[0] <= 1.25 * first[0] + 8 * weights, (first, last)
    assert last[1] <= 1.25 * first[1] + 8, (first, last)
    assert settled[1] <= SETTLED_OBJECTS, settled  # every superseded snapshot was released
    assert max(s[1] for s in samples) < NODES * STORE_BYTES / 2  # far from full
    assert max(s[3] for s in samples) == 0  # nothing was ever spilled to disk
    assert not not_dead, f"actors not DEAD after shutdown: {not_dead}"
    assert not _alive(actor_processes), f"actor processes left after shutdown: {_alive(actor_processes)}"
    assert not strays, strays_doc  # only Ray's pool of idle workers


# --------------------------------------------------------------------------- measuring


def _store_usage(nodes) -> tuple[int, int, int]:
    """(bytes used, objects, bytes ever spilled) summed over the object stores of ``nodes``, asked
    of each raylet."""
    from ray._private.internal_api import node_stats

    used = objects = spilled = 0
    for node in nodes:
        stats = node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False).store_stats
        used += stats.object_store_bytes_used
        objects += stats.num_local_objects
        spilled += stats.spilled_bytes_total
    return used, objects, spilled


class StoreSampler(threading.Thread):
    """Samples (seconds since start, bytes used, objects, bytes spilled, the machine's 1-minute
    load average) every ``SAMPLE_EVERY_S`` until stopped."""

    def __init__(self, nodes) -> None:
        super().__init__(daemon=True)
        self.nodes, self.samples, self.errors = nodes, [], []
        self._stop_event = threading.Event()
        self.begin = 0.0

    def start(self) -> None:
        self.begin = time.perf_counter()
        super().start()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                usage = _store_usage(self.nodes)
                self.samples.append((time.perf_counter() - self.begin, *usage, os.getloadavg()[0]))
            except Exception as exc:  # a slow raylet answer must not end the sampling
                self.errors.append(repr(exc))
            self._stop_event.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(30)


def _timeline(samples: list[tuple], duration: float) -> str:
    """Mean MiB / objects / machine load over each tenth of the training time."""
    parts = []
    for tenth in range(10):
        part = [s for s in samples if tenth * duration / 10 <= s[0] < (tenth + 1) * duration / 10]
        if part:
            n = len(part)
            mib = sum(s[1] for s in part) / n / (1 << 20)
            parts.append(f"{mib:.1f}/{sum(s[2] for s in part) / n:.0f}/{sum(s[4] for s in part) / n:.0f}")
    return " ".join(parts) + " (MiB/objects/load)"


def _quarter_means(samples: list[tuple], duration: float) -> list[tuple[float, float]]:
    """Mean (bytes, objects) over the first quarter, the middle half and the last quarter of the
    training time after the warm-up."""
    start = WARM_UP * duration
    quarter = (duration - start) / 4

    def mean(lo: float, hi: float) -> tuple[float, float]:
        part = [s for s in samples if start + lo * quarter <= s[0] < start + hi * quarter] or samples
        return sum(s[1] for s in part) / len(part), sum(s[2] for s in part) / len(part)

    return [mean(0, 1), mean(1, 3), mean(3, 4.01)]


def _actors(job) -> list[dict]:
    """This job's actors as the GCS knows them (no dashboard needed)."""
    return [a for a in ray._private.state.actors().values() if a["JobID"] == job]


def _cluster_processes(cluster: Cluster) -> dict[int, tuple[float, str]]:
    """pid -> (create time, name) of every process the cluster started (GCS, raylets...) and of
    their descendants (actor processes, idle pool workers)."""
    import psutil  # ships with Ray (ray/thirdparty_files)

    found: dict[int, tuple[float, str]] = {}
    for node in cluster.list_all_nodes():
        for infos in node.all_processes.values():
            for info in infos:
                try:
                    top = psutil.Process(info.process.pid)
                    for proc in [top, *top.children(recursive=True)]:
                        if proc.status() != psutil.STATUS_ZOMBIE:  # exited, waiting to be reaped
                            found[proc.pid] = (proc.create_time(), proc.name())
                except psutil.NoSuchProcess:
                    pass
    return found


def _alive(processes: dict[int, tuple[float, str]]) -> list[int]:
    """The pids of ``processes`` still running (the same processes, not reused pids)."""
    import psutil

    alive = []
    for pid, (created, _) in processes.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(processes: dict[int, tuple[float, str]], running: dict[int, tuple[float, str]]) -> str:
    """pid, name, parent, command line and whether it ran beside the actors, for each process."""
    import psutil

    lines = []
    for pid, (_, name) in processes.items():
        try:
            proc = psutil.Process(pid)
            cmd = " ".join(proc.cmdline())[:160]
            lines.append(
                f"{pid} {name} (parent {proc.ppid()}, {proc.status()}, already running: {pid in running}) {cmd}"
            )
        except psutil.NoSuchProcess:
            lines.append(f"{pid} {name} (gone)")
    return "; ".join(lines)


def _wait_until(condition, timeout_s: float) -> float:
    """Seconds until ``condition()`` held (or ``timeout_s`` passed)."""
    begin = time.perf_counter()
    while not condition() and time.perf_counter() - begin < timeout_s:
        time.sleep(0.2)
    return time.perf_counter() - begin
