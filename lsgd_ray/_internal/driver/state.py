"""A run's state on disk: checkpoint it, resume from one, restore one into running actors."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import ray
import torch

from lsgd_ray._internal.driver.base import DriverBase
from lsgd_ray._internal.waiting import answers
from lsgd_ray.checkpoint import leader_worker, load_latest, map_leaves, save_checkpoint
from lsgd_ray.config import ConfigError
from lsgd_ray.results import code_version

# Settings that may differ between a run and its resumption (budgets, logging, where things go).
RESUMABLE_CHANGES = {
    "epochs",
    "max_steps",
    "time_budget_s",
    "eval_every_s",
    "target_accuracy",
    "eval_batch_size",
    "output_dir",
    "address",
    "quiet",
    "resume",
    "stop_on_divergence",
    "checkpoint_every_steps",
    "checkpoint_every_s",
    "keep_checkpoints",
    "actor_timeout_s",
}


class RunState(DriverBase):
    def checkpoint(self) -> str | None:
        """Commit a checkpoint of the whole run now (between rounds in synchronous mode; in
        asynchronous mode each worker's state is taken between two of its own steps). A worker
        that died or hangs at this moment postpones it to the next turn (``None``): its
        LocalLeader replaces it at the next round, and a checkpoint needs every worker.
        Synchronous LSGD replaces it now (``GlobalLeader.repair_groups``) and takes the
        checkpoint, so that failures one after another do not postpone every checkpoint."""
        replies = answers([w.get_state.remote() for w in self.workers], self.config.actor_timeout_s)
        lost = [rank for rank, reply in zip(self._ranks(), replies) if reply is None]
        if lost and self.config.algorithm == "lsgd" and self.config.mode == "sync":
            ray.get(self.global_leader.repair_groups.remote())
            self._refresh_handles()
            replies = answers([w.get_state.remote() for w in self.workers], self.config.actor_timeout_s)
            lost = [rank for rank, reply in zip(self._ranks(), replies) if reply is None]
        coordinator = ray.get(self.global_leader.get_state.remote())
        if lost:
            self._say(f"lsgd-ray: checkpoint postponed: worker(s) {lost} died or hang (replaced at the next round)")
            return None
        workers = [reply for reply in replies if reply is not None]
        step = min(w["steps"] for w in workers)
        state = {
            "algorithm": self.config.algorithm,
            "coordinator": _tensors(coordinator),
            "workers": workers,
            "trainer": {
                "history": self.history,
                "train_s": self.train_s,
                "eval_s": self.eval_s,
                "divergence": self._watch.found.to_dict() if self._watch.found else None,
            },
        }
        meta = {
            "algorithm": self.config.algorithm,
            "mode": self.config.mode,
            "num_workers": len(workers),
            "steps_per_worker": step,
            "train_s": self.train_s,
            "code_version": code_version(os.path.dirname(os.path.abspath(__file__))),
            "config": self.config.to_dict(),
        }
        path = save_checkpoint(self.output_dir, step, state, meta, self.config.keep_checkpoints)
        self.schedule.checkpointed(step, self.train_s)
        self.checkpoints.append(str(path))
        ray.get(self.global_leader.note_checkpoint.remote(str(path)))
        self._say(f"lsgd-ray: checkpoint at step {step} -> {path}")
        return str(path)

    def _resume(self, path: str) -> None:
        """Load the newest usable checkpoint under ``path`` into the freshly started actors."""
        state, where = load_latest(path)
        saved = json.loads((where / "meta.json").read_text())
        saved_ranks = [w["rank"] for w in state["workers"]]
        _check_resumable(saved.get("config", {}), self.config.to_dict(), saved_ranks, self._ranks())
        ray.get(self.global_leader.add_events.remote(self._restore(state, where)))
        self.status()  # its events known here now: a coordinator restarted before the next read keeps them
        self.resumed_from = str(where)
        ray.get(self.global_leader.note_checkpoint.remote(self.resumed_from))
        self._say(f"lsgd-ray: resumed from {where} (step {self.schedule.checkpoint_step}, {self.train_s:.1f}s trained)")

    def _ranks(self) -> list[int]:
        """The global rank of each of ``self.workers``."""
        return [rank for g in self.groups for rank in g.ranks]

    def _restore(self, state: dict[str, Any], where: Any) -> list[dict[str, Any]]:
        """Put a checkpoint's state into the running actors and this driver, worker by rank.
        A worker the checkpoint lacks (its group had been dropped when it was written) starts
        from the checkpoint's leader's weights at its step, with a fresh optimizer state; one
        it has beyond the run's workers (a group dropped since) is left out. Returns the
        events to record (the caller adds them to the coordinator's)."""
        saved = {w["rank"]: w for w in state["workers"]}
        ranks, timeout = self._ranks(), self.config.actor_timeout_s
        # a worker lost at this moment (a coordinator restart amid failures) is left out: its
        # LocalLeader replaces it at the next round from the restored leader's weights
        answers([w.set_state.remote(saved[r]) for w, r in zip(self.workers, ranks) if r in saved], timeout)
        missing = [(w, r) for w, r in zip(self.workers, ranks) if r not in saved]
        coordinator = _arrays(state["coordinator"])
        ray.get(self.global_leader.set_state.remote(coordinator))
        events = []
        if missing:
            source = leader_worker(state)
            steps = min(w["steps"] for w in state["workers"])
            weights = source["weights"].numpy()
            answers([w.reset_to.remote(weights, steps) for w, _ in missing], timeout)
            origin = f"worker {source['rank']}'s weights in the checkpoint"
            event = {
                "event": "workers_restarted",
                "ranks": [r for _, r in missing],
                "reason": "not in the checkpoint (their group had been dropped)",
                "step": steps,
                "from": origin,
                "time": time.time(),
            }
            events.append(event)
            self._say(f"lsgd-ray: workers {event['ranks']} {event['reason']}: started from {origin}")
        trainer = state["trainer"]
        self.history = list(trainer["history"])
        self._watch.resume(self.history, trainer.get("divergence"))
        self.train_s, self.eval_s = float(trainer["train_s"]), float(trainer["eval_s"])
        self.schedule.checkpointed(min(w["steps"] for w in state["workers"]), self.train_s)
        self.schedule.evaluated(self.train_s)
        return events


def resumed_run_dir(resume: str | None) -> str | None:
    """The run directory a ``resume`` path belongs to (a run dir, or one of its checkpoints)."""
    if not resume:
        return None
    path = os.path.abspath(resume)
    if os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path))
    return path[: -len("/checkpoints")] if path.endswith("/checkpoints") else path


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], saved_ranks: list[int], ranks: list[int]) -> None:
    """Refuse a checkpoint of another layout (each worker's rank fixes its data shard; ranks
    missing from it are those of a group that had been dropped, started again from its leader)."""
    if not set(saved_ranks) <= set(ranks):
        raise ConfigError(
            f"the checkpoint has workers of ranks {sorted(saved_ranks)}, this run has {len(ranks)} workers: "
            "resume on the same layout"
        )
    differ = [
        f"{key}: {saved[key]!r} then, {now.get(key)!r} now"
        for key in sorted(saved)
        if key not in RESUMABLE_CHANGES and saved[key] != now.get(key)
    ]
    if differ:
        raise ConfigError(
            "resume with the settings the run was started with (only budgets, evaluation, checkpointing "
            "and output may change); these differ: " + "; ".join(differ)
        )


def _tensors(value: Any) -> Any:
    """NumPy arrays as tensors, so a checkpoint loads with ``torch.load(weights_only=True)``."""
    return map_leaves(value, np.ndarray, lambda a: torch.from_numpy(np.array(a, copy=True)))


def _arrays(value: Any) -> Any:
    """The reverse of ``_tensors`` for the coordinators, which never import torch."""
    return map_leaves(value, torch.Tensor, lambda t: t.numpy())
