"""The parameter-server peers, EASGD and DOWNPOUR: their coordinators, and the recovery of their
ParameterServer.

The server runs beside its coordinator, on the driver's node, so a lost node of workers never
takes it. It dies with its coordinator (the restarted coordinator starts a new one from the
checkpoint), or on its own: killed or out of memory, or hung (silent for
``Deadlines.server_s``: it is killed). Then the coordinator starts a new one from the mean of
the workers' weights and the workers go on with it. Synchronous rounds find the lost server
through the center they could not read (``_without_lost_inputs``); asynchronous workers' loops
end at their next exchange with it (a hung one's after ``Deadlines.server_call_s``,
``ServerSilent``), and are started again on their own processes, with an exchange that names
the new server (``restart_loops``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.parameter_server import ParameterServer
from lsgd_ray._internal.peer_coordinators import PeerCoordinator
from lsgd_ray._internal.protocol import DownpourExchange, ElasticExchange, Failure, FailureKind, actor_class, node_id
from lsgd_ray._internal.waiting import LATE, ActorTimeoutError, answers, get_all, replies_or_deaths
from lsgd_ray.algorithms import downpour


class EASGD(PeerCoordinator):
    """Workers and the ParameterServer's center pull toward each other every τ steps."""

    evaluated = "center"
    replacement_origin = "the center"
    loops_call_a_server = True

    def _init_state(self) -> None:
        super()._init_state()
        self._server_lock = threading.Lock()  # one check (and recovery) of the server at a time

    def setup(self) -> None:
        first = self._handles()[0].get_weights.remote(count=False)  # every worker starts from the same weights
        self._start_server(first)
        self.alpha = self.cfg.easgd.moving_rate(self.num_workers)

    def _start_server(self, initial: ray.ObjectRef) -> None:
        # beside this coordinator, on the driver's node: a server placed on a node of workers
        # died with it (the re-placement test's EASGD case: "workers keep failing")
        here = NodeAffinitySchedulingStrategy(node_id(), soft=False)
        self.server = actor_class(ParameterServer, num_cpus=0, max_concurrency=1, scheduling_strategy=here).remote(
            initial, self.cfg.comm_dtype
        )
        # started before set-up ends: a worker lost meanwhile fails the set-up, which the driver
        # then makes again once the worker is replaced (a server that never started, later)
        get_all([self.server.__ray_ready__.remote()], self.deadlines.start_s, ["ParameterServer"])
        self.center_ref = self.server.get.remote()

    def _mend_server(self) -> None:
        """A ParameterServer that died while this coordinator lives is replaced by a new one
        holding the mean of the workers' weights, the nearest thing to the center that was lost
        (every worker is pulled toward the center, and the center toward every worker), or, no
        worker answering, the center in the newest checkpoint (``_new_server_weights``).
        Asynchronous mode: every LocalLeader hands the new server to the loops it starts from
        now on. One that is only slow to answer (busy with the workers' pushes) is waited for;
        one silent for ``server_s`` is hung (a stopped process): it is killed and replaced the
        same way (its center never came: the workers waiting on it were waiting forever)."""
        with self._server_lock:
            ping = self.server.__ray_ready__.remote()
            wait_s = self.deadlines.server_s
            ((_, died),) = replies_or_deaths([ping], wait_s, ["ParameterServer"], late_ok=True)
            if died == LATE:
                died = f"hung (no answer within {wait_s:g}s)"
                with contextlib.suppress(Exception):
                    ray.kill(self.server)
            if not died:
                return
            initial, origin = self._new_server_weights()
            self._start_server(initial)
            self.events.append(
                {"event": "server_replaced", "reason": died, "step": self.step, "from": origin, "time": time.time()}
            )
            self.log.warning(f"ParameterServer {died}: a new one from {origin} at step {self.step}")
            if self._async_args:  # a LocalLeader lost meanwhile is re-formed with these
                self._async_args = (*self._async_args[:-1], self._exchange())
                answers([ll.use_exchange.remote(self._async_args[-1]) for ll in self.local_leaders], self.timeout_s)

    def _new_server_weights(self) -> tuple[ray.ObjectRef, str]:
        """What a new server starts from, and its name: the mean of the workers that answer
        (through the LocalLeaders that do: one may be lost too), else (every one struck, or
        being replaced: a chaos run's abort) the center in the run's newest checkpoint."""
        per_group = answers([ll.worker_handles.remote() for ll in self.local_leaders], self.timeout_s)
        try:
            return ray.put(self._mean_of([h for handles in per_group if handles for h in handles])), "the workers' mean"
        except ActorTimeoutError as exc:
            if self.last_checkpoint is None:
                raise
            from lsgd_ray.checkpoint import CheckpointError, load_latest  # imports torch: only here

            try:
                state, where = load_latest(self.last_checkpoint)
            except CheckpointError as unusable:
                raise ActorTimeoutError(f"{exc}, and the checkpoint is unusable ({unusable})") from None
            center = np.asarray(state["coordinator"]["center"], dtype=np.float32)
            return ray.put(center), f"the center in checkpoint {where.name}"

    def _current_center(self) -> ray.ObjectRef:
        """The center to hand out: from a new server if it was lost, read again if the last
        round's failed with the server alive (a worker's difference lost with its LocalLeader
        before the server read it: the server's center is then the one before that round)."""
        self._mend_server()
        try:
            ray.get(self.center_ref, timeout=0)
        except GetTimeoutError:
            pass  # still being computed
        except RayError:
            self.center_ref = self.server.get.remote()
        return self.center_ref

    def _next_step(self, step: int) -> int:
        return (step // self.cfg.easgd.tau + 1) * self.cfg.easgd.tau

    def _replacement(self, rank: int, args: tuple) -> tuple[list[Any], tuple, str]:
        # The center: the model EASGD evaluates, and the point every worker is elastically
        # tied to; the new worker then does the lost one's part of the round from it.
        weights = self.leader_weights()  # the center as it is now (a lost server replaced first)
        return weights, (*args[:2], self.center_ref), "the center"

    def _without_lost_inputs(self, rank: int, args: tuple) -> tuple | None:
        # The round's one input is the center, lost with the server, or with a difference the
        # server never read: the worker goes on with the center as it is now.
        return (*args[:2], self._current_center())

    def _waiting_on_inputs(self, failures: list[Failure]) -> list[Failure]:
        # a round's workers wait for the center before their first step: with the server hung,
        # none answers, and each was taken for hung and replaced (then the server was, too)
        if not any(f.kind is FailureKind.HUNG for f in failures):
            return failures
        server = self.server
        self._mend_server()  # a hung server is killed, and its center is lost to the waiting workers
        if self.server is server:
            return failures
        lost = "the ParameterServer was replaced"
        return [Failure(f.rank, FailureKind.LOST_INPUT, lost) if f.kind is FailureKind.HUNG else f for f in failures]

    def _train(self, num_steps: int, target: int) -> list[dict[str, Any]]:
        results, diffs = self._call(
            "train_elastic", [(num_steps, self.alpha, self.center_ref)] * self.num_workers, num_returns=2
        )
        # the next round's center, computed from the differences without waiting here
        self.center_ref = self.server.elastic_round.remote(self.alpha, *[d[0] for d in diffs])
        return results

    def leader_weights(self) -> list[ray.ObjectRef]:
        """The center in full precision (the round's own reference when that is what travels)."""
        center = self._current_center()
        exact = self.cfg.mode == "sync" and self.cfg.comm_dtype == "float32"
        return [center if exact else self.server.weights.remote()]

    def get_state(self) -> dict[str, Any]:
        center = ray.get(self.leader_weights()[0])
        return {**super().get_state(), "center": np.array(center, copy=True)}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "center" in state:  # a part of the state (events, a step count) leaves the center as it is
            self._mend_server()
            ray.get(self.server.set.remote(state["center"]))
            self.center_ref = self.server.get.remote()

    def _exchange(self) -> Any:
        return ElasticExchange(self.server, self.cfg.easgd.tau, self.alpha, self.deadlines.server_call_s)

    def restart_loops(self, failed: dict[int, Failure]) -> dict[int, list[ray.ObjectRef | None]]:
        """Asynchronous mode: a loop that ended when the server it called died, or gave up
        waiting on it, starts again on the same process, from its own weights, with the new
        server (a silent one found hung is replaced first; one only busy is kept); dead workers
        are replaced as for every peer (also those whose LocalLeader died meanwhile)."""
        self._mend_server()
        in_place = sorted(
            r for r, f in failed.items() if f.kind in (FailureKind.LOST_A_CALLEE, FailureKind.SERVER_SILENT)
        )
        calls = [
            self.local_leaders[self._locate(r)[0]].restart_loop.remote(r, failed[r].kind is FailureKind.SERVER_SILENT)
            for r in in_place
        ]
        replies = replies_or_deaths(calls, self.timeout_s, [f"LocalLeader of worker {r}" for r in in_place])
        restarted: dict[int, list[ray.ObjectRef | None]] = {}
        rest = {r: why for r, why in failed.items() if r not in in_place}
        for rank, (reply, died) in zip(in_place, replies):
            if died:
                rest[rank] = Failure(rank, FailureKind.GROUP_LOST, died)
            elif reply[0] is None:
                raise RuntimeError(
                    f"worker {rank}'s loop failed: {failed[rank].reason}, and that actor was not a lost ParameterServer"
                )
            else:
                restarted[rank] = reply
        if rest:
            restarted.update(super().restart_loops(rest))
        return restarted


class Downpour(EASGD):
    """An asynchronous parameter server: workers push updates and fetch the server's weights."""

    evaluated = "parameter server"
    replacement_origin = "the server's weights"

    def _exchange(self) -> Any:
        c = self.cfg.downpour
        scale = downpour.server_scale(c.rule, self.num_workers)
        return DownpourExchange(self.server, c.n_push, c.n_fetch, scale, self.deadlines.server_call_s)

    def leader_weights(self) -> list[ray.ObjectRef]:
        self._mend_server()
        return [self.server.weights.remote()]
