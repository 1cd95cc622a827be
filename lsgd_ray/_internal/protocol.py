"""What the actors tell each other about the run: the workers' spec, the standing orders a
coordinator gives asynchronous workers, and how actors are made and find their node.

Nothing here imports torch. Ray imports an actor's class module wherever a handle to it is
unpickled, so every process that holds Worker handles (the LocalLeaders, and the coordinators,
which pull and replace workers directly) imports the Worker's module: that module names torch
lazily (``lazy.py``), and the model, dataset and optimizer factories reach the Workers through
the LocalLeaders ``Unopened``, so neither kind of process loads torch
(``scripts/startup_breakdown.py`` measures where start-up goes).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import ray

from lsgd_ray.algorithms import downpour, easgd
from lsgd_ray.config import DataParallelConfig, DiLoCoConfig, LSGDConfig, OptimizerConfig
from lsgd_ray.wire import encode


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to know about the run (built once by the trainer)."""

    num_workers: int
    batch_size: int
    seed: int
    lsgd: LSGDConfig
    optimizer: OptimizerConfig
    cpus: float = 1.0
    gpus: float = 0.0
    num_groups: int = 1  # at the start (whether a local leader exists to be pulled toward)
    redeal_shards: bool = False
    diloco: DiLoCoConfig | None = None  # DiLoCo runs only
    comm_dtype: str = "float32"  # how weights travel (lsgd_ray.wire.encode)
    data_parallel: DataParallelConfig | None = None  # data-parallel runs only: gradient compression
    step_delay_s: dict[int, float] = field(default_factory=dict)
    collective_timeout_s: float = 120.0


@dataclass(frozen=True)
class Unopened:
    """A value that LocalLeaders and coordinators hand on to Workers without unpickling it, so
    what it needs (torch, the model's module) is never imported there: its object reference
    travels nested in this box, which Ray leaves unresolved, and becomes the value itself where
    it is a top-level argument of a Worker's creation."""

    ref: ray.ObjectRef

    @classmethod
    def put(cls, value: Any) -> Unopened:
        return cls(ray.put(value))


def actor_class(cls: type, **options: Any) -> Any:
    """``ray.remote(**options)(cls)``. Ray's type hints for ``ray.remote`` know neither
    ``max_concurrency`` nor node-affinity scheduling, so the one exemption for them lives here."""
    return ray.remote(**options)(cls)  # type: ignore[call-overload]


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is emitted, not as it was when the handler
    was made: pytest and notebooks replace ``sys.stderr``, and a handler holding an old one
    writes where nobody reads."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def actor_log(tag: str) -> logging.LoggerAdapter:
    """How an actor reports what it handled (a worker replaced, a group re-formed): a line
    ``lsgd-ray TAG: message`` on the actor's stderr, which Ray forwards to the driver prefixed
    with the actor and its pid. Through ``logging`` (logger ``lsgd_ray.actors``), so a user can
    raise its level or add handlers from a ``worker_process_setup_hook``."""
    logger = logging.getLogger("lsgd_ray.actors")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("lsgd-ray %(tag)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line each, whatever the process's root logger does
    return logging.LoggerAdapter(logger, {"tag": tag})


def node_id() -> str:
    """The Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id()


def node_ip() -> str:
    """The address this process's Ray node was started with."""
    return ray.util.get_node_ip_address()


# ---------------------------------------------------------------- failures


class FailureKind(StrEnum):
    """Why a worker gave no answer to a call."""

    DIED = "died"  # its process is gone
    HUNG = "hung"  # no answer within the timeout (stopped, deadlocked, swapped out)
    LOST_INPUT = "lost an input"  # alive, but an argument's producer died or hung
    BROKEN = "broken collective"  # alive; its collective failed with a lost peer
    GROUP_LOST = "group lost"  # its LocalLeader died, and the worker with it
    LOST_A_CALLEE = "lost an actor it called"  # an asynchronous loop's call failed: EASGD's server died, say
    SERVER_SILENT = "server silent"  # an asynchronous loop gave up waiting on its ParameterServer


@dataclass(frozen=True)
class Failure:
    """One worker's failed call, as a LocalLeader reports it to its coordinator (``rank``: the
    worker's global rank; inside the LocalLeader, its index in the group) and the coordinator
    decides on it: replace the worker, re-run it without the lost input, or re-form the group."""

    rank: int
    kind: FailureKind
    detail: str = ""  # the error's name, the timeout, the collective's message

    @property
    def reason(self) -> str:
        """The words for events and logs."""
        return {
            FailureKind.DIED: f"died ({self.detail})",
            FailureKind.HUNG: f"no answer within {self.detail} (hung)",
            FailureKind.LOST_INPUT: f"lost an input ({self.detail})" if self.detail else "lost an input",
            FailureKind.BROKEN: self.detail,
            FailureKind.GROUP_LOST: f"its LocalLeader {self.detail}",
            FailureKind.LOST_A_CALLEE: f"lost an actor it called ({self.detail})",
            FailureKind.SERVER_SILENT: f"its ParameterServer gave no answer within {self.detail}",
        }[self.kind]


class ServerSilent(RuntimeError):
    """An asynchronous loop gave up waiting on its ParameterServer (``wait_s``), before its
    LocalLeader would take the worker for hung: the server is hung or too busy, which its
    coordinator tells apart (``EASGD.restart_loops``) before the loop starts again."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"the ParameterServer gave no answer within {wait_s:g}s")
        self.wait_s = wait_s

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a worker, read by the driver
        return (ServerSilent, (self.wait_s,))


def fetch_from_server(server: Any, wait_s: float) -> Any:
    """The server's weights, or ``ServerSilent`` after ``wait_s``."""
    try:
        return ray.get(server.get.remote(), timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        raise ServerSilent(wait_s) from None


class EveryWorkerLost(RuntimeError):
    """A synchronous peer's round lost every worker at once (its collective has no survivor to
    restart the others from): the driver puts the run's last checkpoint into new workers."""


def event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    """What tells one event from another (an event's time is taken once, where it happens)."""
    return (event["event"], event.get("rank"), event.get("group"), event.get("time"))


def groups_out(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The groups that ``events`` show dropped and not rejoined since, each with its drop's event."""
    out: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "group_dropped":
            out[e["group"]] = e
        elif e["event"] == "group_rejoined":
            out.pop(e["group"], None)
    return out


# ---------------------------------------------------------------- a LocalLeader's replies


@dataclass(frozen=True)
class GroupRound:
    """A LocalLeader's reply to a synchronous LSGD round (``train_round``)."""

    group: int
    estimates: list[float]  # each worker's, by index in the group
    leader: int  # global rank of the group's leader; -1: no worker is usable
    leader_estimate: float
    # the leader's weights, published once (when asked to); a reference inside a reply is
    # passed on, never fetched by Ray on the way
    leader_ref: ray.ObjectRef | None
    compute_s: list[float]  # each worker's time in its steps this round
    events: list[dict[str, Any]]  # workers replaced or reset meanwhile


@dataclass(frozen=True)
class GroupCall:
    """A LocalLeader's reply to a peer coordinator's ``call_workers``: each called worker's
    result (``None`` for a failed one), its second return when asked for (wrapped), and the
    failures by global rank."""

    group: int
    results: list[Any]
    refs: list[list[ray.ObjectRef]]
    failures: list[Failure]


# ---------------------------------------------------------------- standing orders to a worker
# A coordinator hands one to each asynchronous worker; the worker calls ``start`` once and
# ``after_step`` after each of its steps, on its training thread.


@dataclass(frozen=True)
class ElasticExchange:
    """Asynchronous EASGD: every ``tau`` of this worker's steps, exchange with the center."""

    server: Any
    tau: int
    alpha: float
    wait_s: float = math.inf  # on the server's answer (``fetch_from_server``)

    def start(self, worker: Any) -> None:
        """Nothing to remember: the center is read fresh at every exchange."""

    def after_step(self, worker: Any) -> None:
        if worker.steps % self.tau:
            return
        center = fetch_from_server(self.server, self.wait_s)
        diff = easgd.elastic_worker_step(worker.state.flat, worker.on_device(center), self.alpha)
        sent = encode(diff.cpu().numpy(), worker.spec.comm_dtype)
        self.server.add.remote(sent, self.alpha)  # fire and forget
        worker.bytes_received += center.nbytes
        worker.bytes_sent += sent.nbytes
        worker.exchanges += 1


@dataclass(frozen=True)
class DownpourExchange:
    """DOWNPOUR: push the accumulated update every ``n_push`` steps (the server adds it times
    ``scale``), fetch every ``n_fetch``."""

    server: Any
    n_push: int
    n_fetch: int
    scale: float
    wait_s: float = math.inf  # on the server's answer (``fetch_from_server``)

    def start(self, worker: Any) -> None:
        """The weights the first push is measured from: the worker's before its first step."""
        worker.base = worker.state.flat.clone()

    def after_step(self, worker: Any) -> None:
        flat = worker.state.flat
        if downpour.due(worker.steps, self.n_push):
            update = downpour.accumulated_update(flat, worker.base)
            self.server.add.remote(update.cpu().numpy(), self.scale)
            worker.base.copy_(flat)
            worker.bytes_sent += worker.state.nbytes
            worker.exchanges += 1
        if downpour.due(worker.steps, self.n_fetch):
            flat.copy_(worker.on_device(fetch_from_server(self.server, self.wait_s)))
            worker.base.copy_(flat)
            worker.bytes_received += worker.state.nbytes
