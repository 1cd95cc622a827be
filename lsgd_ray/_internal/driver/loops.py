"""The training loops: synchronous rounds driven by the coordinator, or every worker's own
asynchronous loop, both paced by one ``Schedule`` of evaluation, checkpoint and budget
deadlines. Failures of the coordinator and of the workers' loops go to the ``Supervisor``."""

from __future__ import annotations

import math
import time
from typing import Any

import ray

from lsgd_ray._internal.driver.records import Records
from lsgd_ray._internal.driver.supervisor import RESTART_ATTEMPTS, Supervisor
from lsgd_ray._internal.schedule import ASYNC_POLL_S
from lsgd_ray._internal.waiting import ActorTimeoutError
from lsgd_ray.algorithms import ALGORITHMS


class Loops(Supervisor, Records):
    def run_rounds(self, seconds: float = math.inf, max_step: int | None = None) -> dict[str, Any]:
        """Synchronous mode: run rounds for ``seconds`` or until workers reach ``max_step``."""
        self.start()
        limit = self.schedule.max_step if max_step is None else max_step
        limit = limit if math.isfinite(limit) else 2**62
        begin = time.perf_counter()
        try:
            status = ray.get(self.global_leader.run_rounds.remote(seconds, limit))
        except ray.exceptions.RayActorError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise  # the coordinator lives; something it waited on failed
            self.train_s += time.perf_counter() - begin
            self._restart_coordinator(f"died ({type(exc).__name__})")
            return self.status()
        self.train_s += time.perf_counter() - begin
        return self._seen(status)

    def _fit_sync(self) -> None:
        """Rounds in chunks that end at the next evaluation, checkpoint or end of the budget. The
        coordinator may die in any call between rounds too (a checkpoint, an evaluation): it is
        restarted as in ``run_rounds`` and the turn taken again."""
        self.schedule.evaluated(self.train_s)
        while not self._supervised(self._sync_turn):
            pass

    def _sync_turn(self) -> bool:
        """Rounds up to the next deadline, then what is due; whether the run is over."""
        schedule = self.schedule
        limit = schedule.step_limit()
        status = self.run_rounds(schedule.wait_s(self.train_s), int(limit) if math.isfinite(limit) else None)
        done = schedule.finished(status["step"], self.train_s)
        if schedule.checkpointing and (done or schedule.checkpoint_due(status["step"], self.train_s)):
            self.checkpoint()
        if done:
            return True
        if schedule.evaluation_due(self.train_s):
            if not self._evaluated_or_postponed():
                # every worker lost or hung between two rounds (an AL-DSGD chaos run's abort):
                # the next round replaces them, and the evaluation follows it
                schedule.postponed(self.train_s)
                return False
            schedule.evaluated(self.train_s)
            if self._evaluation_ends_run():
                if schedule.checkpointing:
                    self.checkpoint()
                return True
        return False

    def _evaluated_or_postponed(self) -> bool:
        """``evaluate_leader``; False, and said, if it had to be postponed: no worker answered in
        time (every one lost or hung at this moment)."""
        try:
            self.evaluate_leader()
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, TimeoutError):
                raise
            self._say(f"lsgd-ray: evaluation postponed: {exc.cause}")
            return False
        return True

    def _stop_loops(self, loops: dict[int, ray.ObjectRef]) -> None:
        """Asynchronous mode, at the end: every loop stopped. One that died meanwhile (or was
        killed as hung) is restarted as during the run, so every worker is there at the end, and
        stopped in turn; ``stop`` is sent again at every poll, as a replacement's loop may start
        after the first one arrived. Loops still running after a hung worker would have been
        detected and replaced raise an error naming them."""
        deadline = time.monotonic() + self.deadlines.replace_s + 2 * self.config.actor_timeout_s
        while True:
            for worker in self.workers:
                worker.stop.remote()
            ready, pending = ray.wait(list(loops.values()), num_returns=len(loops), timeout=ASYNC_POLL_S)
            if self._restart_dead_loops(loops, ready):
                continue
            if not pending:
                return
            if time.monotonic() > deadline:
                late = ", ".join(f"worker {r}" for r, ref in loops.items() if ref in set(pending))
                raise ActorTimeoutError(f"{late}: still training after being told to stop")

    def _fit_async(self) -> None:
        """Every worker's own loop; the driver wakes for evaluations, checkpoints, failures and
        the end of the budget."""
        cfg, schedule = self.config, self.schedule
        report_every = ALGORITHMS[cfg.algorithm].async_report_period(cfg)
        max_steps = None if not math.isfinite(schedule.max_step) else int(schedule.max_step)
        begin, trained = time.perf_counter(), self.train_s  # resumed runs continue the clock
        started_with = len(self.topology.groups) if self.topology else 0
        loops: dict[int, ray.ObjectRef] = {}
        died = ""  # why the coordinator died: it is restarted, and starts the loops again
        restarts = 0  # in a row, each new coordinator dying before its loops started
        running = False
        while True:
            try:
                if died:
                    self._restart_coordinator(died)
                    died, begin, trained = "", time.perf_counter(), self.train_s  # the checkpoint's clock
                if not running:  # a coordinator that dies meanwhile is restarted, and starts them again
                    loops = {}
                    self._take_loops(loops, ray.get(self.global_leader.start_async.remote(report_every, max_steps)))
                    schedule.evaluated(trained)
                    running, restarts = True, 0
                # this often at least: loops that ended (their worker died) are restarted, the step
                # count looked at for checkpoints, and a dropped group's chance to rejoin taken
                wait = min(schedule.wait_s(self.train_s), ASYNC_POLL_S)
                dropped = len(self.groups) < started_with  # LSGD went on without a group
                ready, pending = ray.wait(list(loops.values()), num_returns=len(loops), timeout=wait)
                self.train_s = trained + time.perf_counter() - begin
                if self._restart_dead_loops(loops, ready):
                    continue
                if dropped and pending:  # a node with room for a dropped group: it rejoins
                    self._take_loops(loops, ray.get(self.global_leader.rejoin_groups.remote()))
                if not pending:
                    break
                if schedule.time_left(self.train_s) <= 0 or self._evaluation_ends_run():
                    self._stop_loops(loops)
                    self.train_s = trained + time.perf_counter() - begin
                    break
                if schedule.checkpointing and schedule.checkpoint_due(self.status()["step"], self.train_s):
                    self.checkpoint()  # each worker's state between two of its steps
                if schedule.evaluation_due(self.train_s):
                    # the workers keep training meanwhile; one postponed (every worker lost or
                    # hung at this moment) is made at a next turn, once their loops are restarted
                    if not self._evaluated_or_postponed():
                        continue
                    # reached the target: stop at the next turn, without waiting
                    schedule.evaluated(self.train_s, now_again=self._evaluation_ends_run())
            except ray.exceptions.RayActorError as exc:
                restarts += 1
                if not self._coordinator_died(exc) or restarts > RESTART_ATTEMPTS:
                    raise
                if running:
                    self.train_s = trained + time.perf_counter() - begin
                # every loop stops (one a dead coordinator started unknown to the driver too:
                # a worker runs one loop at a time); the new coordinator starts them again
                for worker in self.workers:
                    worker.stop.remote()
                if loops:
                    ray.wait(list(loops.values()), num_returns=len(loops), timeout=self.deadlines.start_s)
                died, running, loops = f"died ({type(exc).__name__})", False, {}
        ray.get(list(loops.values()))  # a loop that failed raises here
        if schedule.checkpointing:
            self.checkpoint()
