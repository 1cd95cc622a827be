"""Chaos runs: a long run per algorithm on a multi-node ``ray.cluster_utils.Cluster`` while a
seeded killer strikes at random, then the report (per algorithm and per failure kind: injected,
recovered, time to recover, run aborts, accuracy against an undisturbed run of as many steps,
object-store use over time, processes left after shutdown).

Failure kinds (``--kinds``; a victim is picked at random among the live ones):

- ``worker_kill``: a Worker process SIGKILLed;
- ``worker_stop``: a Worker process SIGSTOPped (hung: detected by ``actor_timeout_s``, then
  killed and replaced by the run; the script SIGCONTs any it stopped that outlived the run);
- ``local_leader``: a LocalLeader SIGKILLed (its workers die with it);
- ``coordinator``: the GlobalLeader, or the peer's coordinator, SIGKILLed (the driver restarts it
  from the last checkpoint);
- ``server``: EASGD's and DOWNPOUR's ParameterServer SIGKILLed on its own (its coordinator starts
  a new one from the workers' mean); struck only in their runs;
- ``server_stop``: their ParameterServer SIGSTOPped (hung: its coordinator finds it silent for
  3 x ``actor_timeout_s``, kills it and starts a new one the same way); only in their runs;
- ``node``: a node holding a group removed from the cluster, as a spot node vanishes, and a
  fresh node added a few seconds later. LSGD runs without a spare: the group is dropped and
  rejoins on the fresh node. The peers cannot go on with fewer workers, so their cluster keeps
  one spare node: the group is re-placed on it at once and the fresh node is the next spare.

The gap between two failures is exponential with mean ``--mtbf`` seconds. A failure counts as
recovered when the run records an event after it that recovers what was struck
(``worker_replaced`` for the struck worker's rank, ``group_replaced`` or ``group_rejoined`` for
its group, ``coordinator_restarted``, ``server_replaced``) and the run ends without an abort; time to recover is from the strike to that event
(a dropped group counts only once it rejoined). The killer learns which workers it struck from
the actors' ``__repr__`` (``Worker(rank=3, group=1)``), as Ray's actor table records it.

    .venv/bin/python scripts/chaos.py --minutes 15 --mtbf 10                  # every algorithm
    .venv/bin/python scripts/chaos.py --algorithms lsgd --minutes 1 --mtbf 5  # a short look
    .venv/bin/python scripts/chaos.py --rematch runs/chaos.json --out runs/chaos-again.json

Every algorithm's report is written to ``--out`` (JSON) as soon as its run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.core.generated import gcs_pb2  # noqa: E402

from lsgd_ray import (  # noqa: E402
    DataParallelConfig,
    DiLoCoConfig,
    EASGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
    Trainer,
)
from lsgd_ray.algorithms.registry import ALGORITHMS  # noqa: E402
from lsgd_ray.data import dataset_factory, dataset_spec  # noqa: E402
from lsgd_ray.models import model_factory  # noqa: E402

KINDS = ("worker_kill", "worker_stop", "local_leader", "coordinator", "node", "server", "server_stop")
SERVER_KINDS = ("server", "server_stop")  # struck only in the runs of SERVED
SERVED = {"easgd", "downpour"}  # the algorithms with a ParameterServer
# name -> (algorithm, settings): every algorithm, sync and async where it has both, and the
# variants with state of their own to recover (Streaming DiLoCo's fragment schedule, PowerSGD's
# error feedback and low-rank factors)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "lsgd": ("lsgd", {"lsgd": LSGDConfig(tau=4, tau_global=16)}),
    "lsgd_async": ("lsgd", {"lsgd": LSGDConfig(tau=4, tau_global=16, mode="async")}),
    "data_parallel": ("data_parallel", {}),
    "local_sgd": ("local_sgd", {}),
    "easgd": ("easgd", {}),
    "easgd_async": ("easgd", {"easgd": EASGDConfig(mode="async")}),
    "downpour": ("downpour", {}),
    "dpsgd": ("dpsgd", {}),
    "aldsgd": ("aldsgd", {}),
    "diloco": ("diloco", {}),
    "diloco_streaming": ("diloco", {"diloco": DiLoCoConfig(fragments=4)}),
    "data_parallel_powersgd": ("data_parallel", {"data_parallel": DataParallelConfig(compression="powersgd")}),
}
# what each kind's recovery is recorded as
RECOVERED_BY = {
    "worker_kill": ("worker_replaced", "group_replaced", "group_rejoined", "coordinator_restarted"),
    "worker_stop": ("worker_replaced", "group_replaced", "group_rejoined", "coordinator_restarted"),
    "local_leader": ("group_replaced", "group_rejoined", "coordinator_restarted"),
    "node": ("group_replaced", "group_rejoined"),  # a drop is not a recovery; its rejoin is
    "coordinator": ("coordinator_restarted",),
    "server": ("server_replaced", "coordinator_restarted"),
    "server_stop": ("server_replaced", "coordinator_restarted"),
    # reports saved before 2026-12-07, when the evaluator was an actor of its own (now it is part
    # of the driver, which no strike kills): ``--rematch`` still reads their strikes
    "evaluator": ("evaluator_replaced",),
}
STOPS = ("worker_stop", "server_stop")  # SIGSTOP (hung), not SIGKILL: SIGCONTed after the run if still there
EXCLUSIVE = {"worker_replaced", "server_replaced", "evaluator_replaced"}  # one new process: it recovers one strike


# what an actor's ``__repr__`` says about it: ``Worker(rank=3, group=1)``, ``LocalLeader(group=1)``
WHO = re.compile(r"\((?:rank=(?P<rank>\d+), )?group=(?P<group>\d+)\)")


@dataclass
class Strike:
    kind: str
    time: float  # wall clock
    victim: str  # what was hit, in words
    pid: int | None = None
    node_id: str | None = None
    ranks: tuple[int, ...] = ()  # the workers struck: the worker's own rank, its LocalLeader's group's, its node's


@dataclass
class Killer:
    """Strikes at exponential intervals until ``stop`` is set; keeps one spare node in the
    cluster and samples the object store between strikes."""

    cluster: Cluster
    coordinator_class: str
    kinds: tuple[str, ...]
    mtbf: float
    rng: random.Random
    cpus_per_node: int
    spare: bool  # the cluster keeps a node free for a lost group (the peers need one)
    spare_delay_s: float = 3.0
    strikes: list[Strike] = field(default_factory=list)
    store: list[tuple[float, float, int]] = field(default_factory=list)  # (time, MiB, objects)
    stopped: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, start): see ``started``
    spares_due: list[float] = field(default_factory=list)  # when a fresh node joins (monotonic clock)
    store_errors: list[str] = field(default_factory=list)  # samples of the object store that failed
    seen: set[tuple[int, int | None]] = field(default_factory=set)  # every actor process, (pid, start)
    group_ranks: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # every worker seen
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    node_start_retries: list[str] = field(default_factory=list)  # fresh nodes that failed to start, tried again

    def run(self) -> None:
        """Strike until ``stop`` is set. Runs in the main thread: Ray adds a node only from there
        (the training runs in another thread)."""
        next_strike = time.monotonic() + self.rng.expovariate(1.0 / self.mtbf)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if self.spares_due and self.spares_due[0] <= now:
                    self.join_due_spare()
                elif now >= next_strike:
                    kind = self.rng.choice(self.kinds)
                    strike = self.strike(kind)
                    if strike is not None:
                        self.strikes.append(strike)
                        print(f"chaos: {time.strftime('%H:%M:%S')} {kind}: {strike.victim}", flush=True)
                    next_strike = time.monotonic() + self.rng.expovariate(1.0 / self.mtbf)
                else:
                    self.stop.wait(min([next_strike, *self.spares_due]) - now)
        except Exception as exc:  # a killer that dies must not look like a quiet run
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.stop.set()
            raise

    def join_due_spare(self) -> None:
        """The fresh node whose turn came joins. One that does not start in time (Ray's "timed
        out during startup": a DiLoCo chaos run's killer died of it on a machine at a load of 12)
        is tried again ``spare_delay_s`` later; the run's report lists the retries."""
        self.spares_due.pop(0)
        try:
            self.cluster.add_node(num_cpus=self.cpus_per_node)
        except Exception as exc:  # Ray raises a bare Exception there
            self.node_start_retries.append(f"{type(exc).__name__}: {exc}")
            self.spares_due.append(time.monotonic() + self.spare_delay_s)

    def actors(self, class_name: str | None) -> list[dict[str, Any]]:
        """The live actors of a class (``None``: all) in this job, from the GCS actor table:
        class, pid, node, and what the actor's ``__repr__`` says of it (rank, group)."""
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        # read raw: ``ray._private.state.actors`` leaves out ``repr_name``
        table = ray._private.state.state._connect_and_get_accessor().get_actor_table(job, "ALIVE")
        found = []
        for raw in table:
            a = gcs_pb2.ActorTableData.FromString(raw)
            if a.pid and class_name in (None, a.class_name):
                who = WHO.search(a.repr_name)
                found.append(
                    {
                        "class": a.class_name,
                        "pid": a.pid,
                        "node_id": a.address.node_id.hex(),
                        "repr": a.repr_name,
                        "rank": int(who["rank"]) if who and who["rank"] else None,
                        "group": int(who["group"]) if who else None,
                    }
                )
        self.seen.update((a["pid"], started(a["pid"])) for a in found)
        for a in found:
            if a["rank"] is not None:
                self.group_ranks[a["group"]].add(a["rank"])
        return found

    def ranks_of(self, group: int | None = None, node_id: str | None = None) -> tuple[int, ...]:
        """The ranks of ``group``'s workers (every one seen: a group keeps its ranks, and at the
        strike one may be dead, being replaced), or of the live workers on ``node_id``."""
        on_node = {w["rank"] for w in self.actors("Worker") if w["rank"] is not None and w["node_id"] == node_id}
        return tuple(sorted(on_node if node_id is not None else self.group_ranks.get(group, set())))

    def strike(self, kind: str) -> Strike | None:
        if kind == "node":
            return self.remove_node()
        class_name = {
            "worker_kill": "Worker",
            "worker_stop": "Worker",
            "local_leader": "LocalLeader",
            "coordinator": self.coordinator_class,
            "server": "ParameterServer",
            "server_stop": "ParameterServer",
        }[kind]
        stopped = {pid for pid, start in self.stopped if same_process(pid, start)}  # struck already
        live = [a for a in self.actors(class_name) if a["pid"] not in stopped]
        if not live:
            return None
        victim = self.rng.choice(live)
        pid, node = victim["pid"], victim["node_id"]
        if victim["rank"] is not None:
            ranks: tuple[int, ...] = (victim["rank"],)
        else:
            ranks = self.ranks_of(group=victim["group"]) if class_name == "LocalLeader" else ()
        try:
            os.kill(pid, signal.SIGSTOP if kind in STOPS else signal.SIGKILL)
        except ProcessLookupError:
            return None  # it died meanwhile
        if kind in STOPS:
            self.stopped.append((pid, started(pid)))
        return Strike(kind, time.time(), f"{victim['repr'] or class_name} pid {pid}", pid, node, ranks)

    def remove_node(self) -> Strike | None:
        """A node that holds workers goes (never the last such: a run needs one group), if the
        cluster keeps a spare, only while a node holds none of this run's actors; a fresh node
        joins ``spare_delay_s`` later."""
        workers = {a["node_id"] for a in self.actors("Worker")}
        anyone = {a["node_id"] for a in self.actors(None)}
        nodes = [n for n in self.cluster.list_all_nodes() if n is not self.cluster.head_node]
        held = [n for n in nodes if n.node_id in workers]
        if len(held) < 2 or (self.spare and all(n.node_id in anyone for n in nodes)):
            return None
        victim = self.rng.choice(held)
        ranks = self.ranks_of(node_id=victim.node_id)
        self.cluster.remove_node(victim, allow_graceful=False)
        self.spares_due.append(time.monotonic() + self.spare_delay_s)
        return Strike("node", time.time(), f"node {victim.node_id[:8]}", None, victim.node_id, ranks)

    def wait_for_removed_nodes(self, timeout_s: float = 120.0) -> list[str]:
        """Wait until Ray lists every node this killer removed as dead: the GCS marks a node
        dead only after its health checks fail (about 30 s by default), and until then a
        plan counts the dead node's CPUs. Returns the ids still listed alive at the timeout."""
        removed = {s.node_id for s in self.strikes if s.kind == "node"}
        deadline = time.monotonic() + timeout_s
        while True:
            listed = {n["NodeID"] for n in ray.nodes() if n["Alive"]} & removed
            if not listed or time.monotonic() > deadline:
                return sorted(listed)
            time.sleep(0.5)

    def sample_store(self) -> None:
        """One sample of the cluster's object store. Ray asks every worker for it, so a stopped
        worker makes it wait (and fail): a sample that fails is counted, not fatal. The address
        is this cluster's: without it Ray reads the newest cluster on the machine, which was
        another one's when a test suite ran beside this script."""
        from ray._private.internal_api import memory_summary

        try:
            summary = memory_summary(address=self.cluster.address, stats_only=True)
        except Exception as exc:  # noqa: BLE001 - e.g. DEADLINE_EXCEEDED while a worker is stopped
            self.store_errors.append(f"{type(exc).__name__}")
            return
        match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", summary)
        if match:
            self.store.append((time.time(), float(match.group(1)), int(match.group(2))))

    def sample_store_until_stopped(self, every_s: float = 5.0) -> None:
        """The object store every ``every_s`` seconds, in its own thread (a sample may block)."""
        while not self.stop.wait(every_s):
            self.sample_store()


def covers(strike: Strike, event: dict) -> bool:
    """Whether ``event`` recovers what ``strike`` hit: its kind recovers the strike's and, where
    both name workers (a replaced worker's rank, a re-formed group's ranks), it names one of the
    workers struck."""
    if event.get("event") not in RECOVERED_BY.get(strike.kind, ()):
        return False
    named = event.get("ranks", [event["rank"]] if "rank" in event else None)
    return named is None or not strike.ranks or bool(set(named) & set(strike.ranks))


def recoveries(
    strikes: list[Strike],
    events: list[dict],
    evaluation_times: list[float],
    end: float | None = None,
    settle_s: float = 0.0,
) -> list[dict]:
    """Each strike with the event that recovered it and the seconds until then: the first event
    after it that covers it (``covers``: a worker's own replacement, its group's re-forming or
    rejoining, a coordinator's restart, the evaluator's replacement). A strike that names no
    worker (the coordinator, the evaluator) takes an event of its own kind first, then any other
    that recovers it; a server's takes the first of its replacement and a coordinator's restart
    (which starts a new server too). A process replaced (``EXCLUSIVE``) recovers one strike; a
    group re-formed recovers every strike it covers, and a coordinator's restart every strike
    before it (a coordinator struck again while it was being restarted is restarted once: both
    strikes end there). An evaluator's strike with no ``evaluator_replaced`` after it (a run
    from before that event) is recovered by a later evaluation in ``evaluation_times``. A
    strike left without one in the last ``settle_s`` before the run's ``end`` is
    ``open_at_end``: the run ended before any call needed what it struck."""
    ordered = sorted(enumerate(events), key=lambda ie: ie[1].get("time", 0))
    chronological = sorted(strikes, key=lambda s: s.time)
    found: dict[int, dict] = {}
    taken: set[int] = set()
    for first_pass in (True, False):
        for n, s in enumerate(chronological):
            if n in found:
                continue
            if s.kind == "evaluator" and not first_pass:
                # a run from before the event: whether a later evaluation ran, not how soon (its
                # history has no wall clock)
                if any(t > s.time for t in evaluation_times):
                    found[n] = {"event": "evaluation", "time": None}
                continue
            own = RECOVERED_BY[s.kind][0]
            for i, e in ordered:
                kind = e.get("event")
                if e.get("time", 0) < s.time or not covers(s, e):
                    continue
                if first_pass and not s.ranks and kind != own and s.kind not in SERVER_KINDS:
                    continue
                if i in taken:
                    continue
                if kind in EXCLUSIVE:
                    taken.add(i)
                found[n] = e
                break
    rows = []
    for n, s in enumerate(chronological):
        e = found.get(n)
        rows.append(
            {
                "kind": s.kind,
                "victim": s.victim,
                "ranks": list(s.ranks),
                "time": s.time,
                "recovered_by": e["event"] if e else None,
                "recovery_s": e["time"] - s.time if e and e["time"] is not None else None,
                # worker steps the run did again: a coordinator's restart rolls back to its checkpoint
                "steps_lost": e.get("steps_lost") if e else None,
                "open_at_end": e is None and end is not None and s.time > end - settle_s,
            }
        )
    return rows


def config_for(name: str, args, output_dir: str, **run: Any) -> TrainConfig:
    algorithm, settings = RUNS[name]
    fields: dict[str, Any] = dict(
        algorithm=algorithm,
        num_groups=args.nodes,
        workers_per_group=args.workers_per_node,
        batch_size=32,
        optimizer=OptimizerConfig(lr=0.05),
        eval_every_s=args.eval_every,
        actor_timeout_s=args.actor_timeout,
        checkpoint_every_s=args.checkpoint_every,
        seed=args.seed,
        output_dir=output_dir,
        quiet=True,
        **settings,
    )
    return TrainConfig(**{**fields, **run})


def started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``), ``None`` if
    it is gone. With it a pid names one process: over a run of half an hour the kernel hands the
    numbers of dead actors to new processes (a chaos run counted a reused pid as left running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def same_process(pid: int, start: int | None) -> bool:
    """Process ``pid`` is still the one that started at ``start`` (``started``)."""
    return start is not None and started(pid) == start


def chaos_run(name: str, args) -> dict[str, Any]:
    """One algorithm: a fresh cluster, the disturbed run, then an undisturbed run of as many
    steps on the same cluster."""
    ds = dataset_spec("digits")
    model_fn = model_factory("mlp", ds.model_input_shape(), ds.num_classes)
    data_fn = dataset_factory("digits")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    spare = RUNS[name][0] != "lsgd"  # LSGD drops a lost group and takes it back later; the peers cannot
    for _ in range(args.nodes + spare):  # one node per group (and the spare)
        cluster.add_node(num_cpus=args.workers_per_node)
    ray.init(address=cluster.address, logging_level="WARNING")
    out: dict[str, Any] = {"algorithm": name, "minutes": args.minutes, "mtbf_s": args.mtbf, "seed": args.seed}
    killer = None
    try:
        os.makedirs(args.tmp, exist_ok=True)
        run_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=args.tmp)  # fresh: no other run's checkpoints
        cfg = config_for(name, args, os.path.join(run_dir, "chaos"), time_budget_s=args.minutes * 60)
        coordinator = ALGORITHMS[cfg.algorithm].coordinator_class().__name__
        with Trainer(model_fn, data_fn, cfg) as trainer:
            kinds = tuple(k for k in args.kinds if k not in SERVER_KINDS or cfg.algorithm in SERVED)
            killer = Killer(cluster, coordinator, kinds, args.mtbf, random.Random(args.seed),
                            args.workers_per_node, spare)  # fmt: skip
            begin, box = time.time(), {}

            def train() -> None:
                try:
                    box["result"] = trainer.fit()
                except Exception as exc:  # an abort: the report says so, the next algorithm runs
                    box["error"], box["traceback"] = exc, traceback.format_exc()
                finally:
                    killer.stop.set()

            training = threading.Thread(target=train, daemon=True)
            sampler = threading.Thread(target=killer.sample_store_until_stopped, daemon=True)
            training.start()
            sampler.start()
            try:
                killer.run()  # until the training ends
            finally:
                killer.stop.set()
                training.join()
                end = time.time()
                sampler.join(timeout=120)
            result = box.get("result")
            if result is not None:
                out["status"], out["error"] = outcome(result)
            else:
                exc = box["error"]
                out["status"], out["error"] = "aborted", f"{type(exc).__name__}: {exc}"
                out["traceback"] = box["traceback"]
                print(out["traceback"], file=sys.stderr, flush=True)
            killer.actors(None)  # every process of the run, to look for after shutdown
            killer.sample_store()
            events = result.events if result else []
            # an evaluation's wall time: the run's start plus its training and evaluation seconds so far
            history = result.history if result else []
            times = _evaluation_times(begin, history)
        for pid, start in killer.stopped:  # a stopped worker the run never killed must not linger
            if same_process(pid, start):
                os.kill(pid, signal.SIGCONT)
        # a strike in the run's last moments may meet no call that needed what it struck
        settle_s = 2 * args.actor_timeout + 15.0
        out["strikes"] = recoveries(killer.strikes, events, times, end=end, settle_s=settle_s)
        out["events"] = events
        out["store"] = killer.store
        out["killer_errors"] = killer.errors
        out["store_sample_errors"] = len(killer.store_errors)
        out["node_start_retries"] = killer.node_start_retries
        if result is not None:
            out.update(
                steps_per_worker=result.steps_per_worker,
                final_test_accuracy=result.final_test_accuracy,
                train_s=result.timings.get("train_s"),
            )
            if result.steps_per_worker:
                # on the cluster as the disturbed run left it, once the nodes it lost are gone
                if lingering := killer.wait_for_removed_nodes():
                    out["killer_errors"].append(f"removed nodes still listed alive: {lingering}")
                calm = config_for(name, args, os.path.join(run_dir, "calm"),
                                  max_steps=result.steps_per_worker, checkpoint_every_s=None)  # fmt: skip
                with Trainer(model_fn, data_fn, calm) as trainer:
                    undisturbed = trainer.fit()
                out["undisturbed_test_accuracy"] = undisturbed.final_test_accuracy
        time.sleep(2.0)  # actors killed at shutdown take a moment to exit
        out["actor_processes_left"] = sorted(p for p, start in killer.seen if same_process(p, start)) if killer else []
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def _evaluation_times(begin: float, history: list[dict]) -> list[float]:
    """Wall-clock times of the evaluations, approximated from the run's start: training and
    evaluation seconds up to each (start-up is before ``begin``)."""
    times, eval_s = [], 0.0
    for h in history:
        eval_s += h.get("eval_s", 0.0)
        times.append(begin + h["train_s"] + eval_s)
    return times


def outcome(result: Any) -> tuple[str, str | None]:
    """A finished run's status and error for the report: a run that survived every strike but
    never made a step (its recoveries took the whole budget) is "stalled", not "completed"
    (the steps of the workers that answered at the end, and of every evaluation)."""
    steps = max([result.steps_per_worker, *(h.get("step", 0) for h in result.history)])
    if result.status == "completed" and steps == 0:
        return "stalled", "no worker made a step in the run's budget"
    return result.status, result.error


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """Per failure kind: injected, recovered, time to recover (median, max)."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for s in out.get("strikes", []):
        by_kind[s["kind"]].append(s)
    kinds = {}
    for kind, rows in sorted(by_kind.items()):
        times = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
        lost = [r["steps_lost"] for r in rows if r.get("steps_lost") is not None]
        kinds[kind] = {
            "injected": len(rows),
            "recovered": sum(r["recovered_by"] is not None for r in rows) if out["status"] != "aborted" else 0,
            "open_at_end": sum(r.get("open_at_end", False) for r in rows) if out["status"] != "aborted" else 0,
            "recovery_s_median": statistics.median(times) if times else None,
            "recovery_s_max": max(times) if times else None,
            "steps_lost_mean": statistics.mean(lost) if lost else None,
            "steps_lost_max": max(lost) if lost else None,
        }
    store = [mib for _, mib, _ in out.get("store", [])]
    return {
        "status": out["status"],
        "kinds": kinds,
        "injected": sum(k["injected"] for k in kinds.values()),
        "recovered": sum(k["recovered"] for k in kinds.values()),
        "open_at_end": sum(k["open_at_end"] for k in kinds.values()),
        "accuracy": out.get("final_test_accuracy"),
        "undisturbed_accuracy": out.get("undisturbed_test_accuracy"),
        "store_mib_first_last_max": [store[0], store[-1], max(store)] if store else None,
        "processes_left": len(out.get("actor_processes_left", [])),
    }


def table(report: dict) -> str:
    lines = [
        "| algorithm | status | kind | injected | recovered | open at end | recover median | max | steps lost (mean) "
        "| accuracy (undisturbed) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in report["runs"]:
        s = run["summary"]
        acc = f"{s['accuracy'] or 0:.3f} ({s['undisturbed_accuracy'] or 0:.3f})"
        for kind, k in s["kinds"].items() or {"-": {"injected": 0, "recovered": 0}}.items():
            med = "-" if k.get("recovery_s_median") is None else f"{k['recovery_s_median']:.1f} s"
            mx = "-" if k.get("recovery_s_max") is None else f"{k['recovery_s_max']:.1f} s"
            lost = "-" if k.get("steps_lost_mean") is None else f"{k['steps_lost_mean']:.0f}"
            lines.append(f"| {run['algorithm']} | {s['status']} | {kind} | {k['injected']} | {k['recovered']} | "
                         f"{k.get('open_at_end', 0)} | {med} | {mx} | {lost} | {acc} |")  # fmt: skip
    total = sum(r["summary"]["injected"] for r in report["runs"])
    survived = sum(r["summary"]["recovered"] for r in report["runs"])
    aborts = sum(r["summary"]["status"] == "aborted" for r in report["runs"])
    stalls = sum(r["summary"]["status"] == "stalled" for r in report["runs"])
    open_ = sum(r["summary"].get("open_at_end", 0) for r in report["runs"])
    lines.append(f"\n{survived} of {total} injected failures recovered, {open_} open when the run ended; "
                 f"{aborts} run abort(s), {stalls} run(s) with no step")  # fmt: skip
    return "\n".join(lines)


def rematch(report: dict[str, Any]) -> dict[str, Any]:
    """A saved report with every run's strikes matched again to its events by the current rules
    (``recoveries``), and its summaries made again. An evaluator's strike with no
    ``evaluator_replaced`` after it keeps its match (the report keeps no evaluation times), and
    an unmatched strike its ``open_at_end``."""
    runs = []
    for run in report["runs"]:
        saved = run.get("strikes", [])
        strikes = [Strike(s["kind"], s["time"], s["victim"], ranks=tuple(s.get("ranks", ()))) for s in saved]
        rows = recoveries(strikes, run.get("events", []), [])
        for row, old in zip(rows, sorted(saved, key=lambda s: s["time"])):
            if row["kind"] == "evaluator" and row["recovered_by"] is None:  # a run from before its event
                row.update(recovered_by=old["recovered_by"], recovery_s=old["recovery_s"])
            row["open_at_end"] = row["recovered_by"] is None and old.get("open_at_end", False)
        again = {**run, "strikes": rows}
        again["summary"] = summarize(again)
        runs.append(again)
    return {**report, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--minutes", type=float, default=15.0, help="training minutes per algorithm")
    p.add_argument("--mtbf", type=float, default=10.0, help="mean seconds between failures")
    p.add_argument("--nodes", type=int, default=4, help="nodes with a group each (and one spare)")
    p.add_argument("--workers-per-node", type=int, default=2)
    p.add_argument("--actor-timeout", type=float, default=10.0, help="a hung actor is declared after this")
    p.add_argument("--checkpoint-every", type=float, default=20.0, help="training seconds")
    p.add_argument("--eval-every", type=float, default=10.0, help="training seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chaos.json")
    p.add_argument("--tmp", default="runs/chaos_tmp")
    p.add_argument("--rematch", metavar="REPORT", help="match a saved report's strikes again by the current rules, "
                   "print its table and write it to --out; runs nothing")  # fmt: skip
    args = p.parse_args()
    if args.rematch:
        try:
            with open(args.rematch) as f:
                again = rematch(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--rematch {args.rematch}: not a chaos report that can be read ({type(exc).__name__}: {exc})")
        with open(args.out, "w") as f:
            json.dump(again, f, indent=1, default=str)
        print(table(again))
        return
    if set(args.kinds) <= set(SERVER_KINDS) and not {RUNS[a][0] for a in args.algorithms} & SERVED:
        p.error(f"--kinds {' '.join(args.kinds)} strikes only the runs of {', '.join(sorted(SERVED))}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": [],
    }
    for name in args.algorithms:
        print(f"chaos: {name}, {args.minutes:g} min, a failure every {args.mtbf:g} s on average", flush=True)
        out = chaos_run(name, args)
        out["summary"] = summarize(out)
        report["runs"].append(out)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)
        s = out["summary"]
        print(f"chaos: {name}: {s['status']}, {s['recovered']}/{s['injected']} recovered, accuracy "
              f"{s['accuracy']} (undisturbed {s['undisturbed_accuracy']})", flush=True)  # fmt: skip
    print(table(report))


if __name__ == "__main__":
    main()
