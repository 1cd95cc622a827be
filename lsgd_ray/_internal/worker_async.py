"""A Worker in asynchronous mode: its own training loop on one thread while pulls, weight
requests and ``stop`` arrive on others. Only the training thread touches the weights: pulls wait
in an inbox (the newest of each kind) and snapshots are requested, and the loop serves both
between two steps, so no step sees half-pulled weights and no request waits longer than a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # no torch at import: see lazy.py
    import torch

    from lsgd_ray._internal.protocol import WorkerSpec
    from lsgd_ray.flat import FlatState


class AsyncWorkerMixin:
    """The asynchronous loop and pull inbox of ``Worker``, which provides the rest."""

    # what the Worker provides
    index: int
    spec: WorkerSpec
    model: torch.nn.Module
    state: FlatState
    steps: int
    compute_s: float
    bytes_sent: float
    _lock: threading.Lock  # guards the inbox, the snapshot requests and ``_async``
    _async: bool
    _stop: threading.Event
    _loop_lock: threading.Lock  # held by the running loop (run_async)
    _pending: list[tuple[np.ndarray | None, float, str]]  # the inbox; None: a reset keeping the weights
    _snapshot_requests: list[dict[str, Any]]
    _reports: list[Any]  # reports the LocalLeader may not have handled yet
    _step: Callable[[], None]
    stats: Callable[[], dict[str, Any]]
    estimate: Callable[[], float]
    _apply_pull: Callable[[np.ndarray, float, str], None]
    _reset: Callable[[np.ndarray | None], None]
    _checkpoint_state: Callable[[], dict[str, Any]]

    def run_async(
        self, local_leader: Any, report_every: int, max_steps: int | None, exchange: Any = None
    ) -> dict[str, Any]:
        """Train at this worker's own speed until ``stop()`` or ``max_steps``.

        Every ``report_every`` steps it tells its LocalLeader how many steps it took and its
        estimate (fire and forget: it never waits on anyone). ``exchange`` is a peer's own
        schedule (EASGD's elastic exchange, DOWNPOUR's pushes and fetches), run after each step.
        """
        # one loop at a time: one still running (started for a coordinator that died before the
        # driver heard of it, a chaos run's abort) is stopped first, and ends within a step
        self._stop.set()
        with self._loop_lock:
            return self._run_loop(local_leader, report_every, max_steps, exchange)

    def _run_loop(self, local_leader: Any, report_every: int, max_steps: int | None, exchange: Any) -> dict[str, Any]:
        self._async, since_report = True, 0
        self._stop.clear()
        self.model.train()
        if exchange is not None:
            exchange.start(self)
        start = time.perf_counter()
        try:
            while not self._stop.is_set() and (max_steps is None or self.steps < max_steps):
                self._apply_pending_pulls()
                self._serve_snapshots()
                self._step()
                since_report += 1
                if exchange is not None:
                    exchange.after_step(self)
                if since_report == report_every:
                    self._report(local_leader, since_report)
                    since_report = 0
            if since_report:
                self._report(local_leader, since_report)
                since_report = 0
            self._wait_for_reports()
        except BaseException:
            if since_report:  # steps taken, counted, before the loop failed (its server lost, say)
                self._report(local_leader, since_report)
            raise
        finally:
            self.compute_s += time.perf_counter() - start
            with self._lock:
                self._async = False  # from now on pulls and snapshots are served directly
            self._apply_pending_pulls()
            self._serve_snapshots()
        return self.stats()

    def _apply_pending_pulls(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for leader, strength, kind in pending:
            if kind == "reset":
                self._reset(leader)
            elif leader is not None:  # pulls always carry weights
                self._apply_pull(leader, strength, kind)

    def _report(self, local_leader: Any, steps: int) -> None:
        import ray

        self.bytes_sent += 16  # step count and estimate
        self._reports.append(local_leader.report.remote(self.index, steps, self.estimate()))
        if len(self._reports) >= 32:  # forget the handled ones (never waits)
            _, self._reports = ray.wait(self._reports, num_returns=len(self._reports), timeout=0)

    def _wait_for_reports(self) -> None:
        """Before the loop returns: the LocalLeader has handled every report, so what they
        caused (a reset of a diverged worker, its event) is there when the driver sees the loop
        end. Without this a fast run ended before its last reports were read (their events lost)."""
        import ray

        if self._reports:
            ray.wait(self._reports, num_returns=len(self._reports), timeout=self.spec.collective_timeout_s)
        self._reports = []

    def stop(self) -> None:
        self._stop.set()

    def _between_steps(self, kind: str) -> Any:
        """Asynchronous mode: have the training thread take a ``weights`` or ``state`` snapshot
        between two steps (if the loop has ended meanwhile, take it here)."""
        request: dict[str, Any] = {"done": threading.Event(), "kind": kind}
        with self._lock:
            if self._async:
                self._snapshot_requests.append(request)
            else:
                return self.state.to_numpy() if kind == "weights" else self._checkpoint_state()
        request["done"].wait()
        return request["value"]

    def _serve_snapshots(self) -> None:
        """Training thread, between steps: one copy of the weights for all waiting requests."""
        with self._lock:
            requests, self._snapshot_requests = self._snapshot_requests, []
        weights = None
        for request in requests:
            if request["kind"] == "weights":
                weights = self.state.to_numpy(copy=True) if weights is None else weights
                request["value"] = weights
            else:
                request["value"] = self._checkpoint_state()
            request["done"].set()
