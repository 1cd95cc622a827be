"""What a run records: evaluations of the evaluated model(s), the progress line, TensorBoard
(through the run's logger), and at the end ``result.json`` and the leader's weights."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from lsgd_ray._internal.driver.base import DriverBase
from lsgd_ray.divergence import divergence_line
from lsgd_ray.flat import load_flat
from lsgd_ray.results import FitResult, communication_summary, summary_lines, write_json

EVAL_ATTEMPTS = 3  # an evaluation whose weights were lost is made again


class Records(DriverBase):
    def leader_weights_ref(self) -> ray.ObjectRef:
        """The evaluated model's weights, by reference: LSGD's leader, the peers' own model."""
        return ray.get(self.global_leader.leader_weights.remote())[0]

    def center_weights_ref(self) -> ray.ObjectRef:
        """LSGD: the mean of all workers' weights, by reference (averaged per group on each
        node, combined by the GlobalLeader; never through this driver)."""
        return ray.get(self.global_leader.center_weights.remote())[0]

    def _evaluated_models(self) -> dict[str, Callable[[], ray.ObjectRef]]:
        """What each evaluation scores: LSGD both its leader and its center, a peer the one
        model it evaluates (its center or workers' mean, under the name "leader")."""
        if self.config.algorithm == "lsgd":
            return {"leader": self.leader_weights_ref, "center": self.center_weights_ref}
        return {"leader": self.leader_weights_ref}

    def _score(self) -> dict[str, dict[str, Any]]:
        """Each evaluated model's test scores, read here from the object store. Weights lost
        before they were read (the worker or the coordinator that owned them died) are asked for
        again, up to ``EVAL_ATTEMPTS`` times; a dead coordinator raises here, for
        ``_supervised`` to restart."""
        for attempt in range(1, EVAL_ATTEMPTS + 1):
            refs = {name: ref() for name, ref in self._evaluated_models().items()}
            try:
                return {name: self.evaluator.evaluate(ray.get(ref)) for name, ref in refs.items()}
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                # the weights' producer died before it answered, or their owner (OwnerDiedError)
                if attempt == EVAL_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def evaluate_leader(self) -> dict[str, Any]:
        """Test loss and accuracy of the evaluated model, recorded in the history. LSGD scores
        both its leader and its center: ``test_*`` are those of ``lsgd.evaluate``'s choice,
        ``leader_test_*`` and ``center_test_*`` both."""
        status = self.status()
        scores = self._score()
        chosen = self.config.lsgd.evaluate if "center" in scores else "leader"
        result = {**scores[chosen], "eval_s": sum(score["eval_s"] for score in scores.values())}
        if "center" in scores:  # LSGD: both models, by name
            for name, score in scores.items():
                result[f"{name}_test_accuracy"] = score["test_accuracy"]
                result[f"{name}_test_loss"] = score["test_loss"]
        samples = status["total_steps"] * self.config.batch_size
        record = {
            "train_s": self.train_s,
            "samples": samples,
            "step": status["step"],
            "leader": status["leader"],
            "evaluated": status["evaluated"],
            **result,
        }
        self.eval_s += result["eval_s"]
        self.history.append(record)
        divergence = self._watch.check(record)
        if self._logger:
            self._logger.log_eval(record)
            comm = communication_summary(self.worker_stats(), self.weight_bytes, status)
            self._logger.log_workers(status["estimates"], samples, comm)
            if divergence:
                self._logger.log_divergence(divergence, samples)
        self._progress(record)
        if divergence:  # even when quiet: the run goes on, but it should not go unnoticed
            print(divergence.warning(), file=sys.stderr, flush=True)
        return record

    def _progress(self, record: dict[str, Any]) -> None:
        rate = record["samples"] / self.train_s if self.train_s else 0.0
        line = (
            f"[step {record['step']:>6} | {self.train_s:7.1f}s] {record['evaluated']}: "
            f"test_acc={record['test_accuracy']:.4f} test_loss={record['test_loss']:.4f} "
        )
        other = "center" if self.config.lsgd.evaluate == "leader" else "leader"
        if f"{other}_test_accuracy" in record:  # LSGD: the model not chosen, in brief
            line += f"({other} {record[f'{other}_test_accuracy']:.4f}) "
        line += f"samples={record['samples']:,} ({rate:,.0f}/s)"
        budget = self._budget_fraction(record["step"])
        if 0 < budget < 1:
            line += f" eta {self.train_s * (1 - budget) / budget:.0f}s"
        self._say(line)

    def _budget_fraction(self, step: int) -> float:
        fractions = []
        if math.isfinite(self.schedule.max_step):
            fractions.append(step / self.schedule.max_step)
        if self.config.time_budget_s:
            fractions.append(self.train_s / self.config.time_budget_s)
        return max(fractions, default=0.0)

    def _evaluation_ends_run(self) -> bool:
        """Whether the last evaluation ends the run: it reached ``target_accuracy``, or it showed
        a divergence and ``stop_on_divergence`` is set."""
        if self.config.stop_on_divergence and self._watch.found is not None:
            return True
        target = self.config.target_accuracy
        return target is not None and bool(self.history) and self.history[-1]["test_accuracy"] >= target

    def _write_result(self, error: str | None) -> FitResult:
        status, stats, history = {}, [], self.history
        try:
            status = self._supervised(self.status)  # a coordinator lost at the end too
            if self.history is not history and error is None:
                # restarted from the checkpoint meanwhile: the history went back to it, and the
                # final evaluation with it; made again, of the weights saved below
                self._supervised(self.evaluate_leader)
                status = self._supervised(self.status)
            stats = self.worker_stats()
            if error is None:
                self._save_leader_weights()
                # the save may have mended the coordinator (a lost ParameterServer replaced): its
                # event too. Read as it is (no handles refreshed); if the coordinator died or
                # failed after the save, the status above stands
                with contextlib.suppress(ray.exceptions.RayError):
                    status["events"] = ray.get(self.global_leader.status.remote())["events"]
        except Exception as exc:  # the cluster may be gone: write what we know
            error = error or f"could not collect the final state: {exc}"
        final = self.history[-1] if self.history else {}
        timings = {
            "startup_s": self.startup_s,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "total_s": time.perf_counter() - self._begin if self._begin else 0.0,
            "round_wall_s": status.get("round_wall_s", 0.0),
            "round_compute_s": status.get("round_compute_s", 0.0),
            "worker_compute_s": [s["compute_s"] for s in stats],
        }
        result = FitResult(
            output_dir=os.path.abspath(self.output_dir),
            status="failed" if error else "diverged" if self._watch.found else "completed",
            algorithm=self.config.algorithm,
            evaluated=final.get("evaluated", status.get("evaluated", "")),
            final_test_accuracy=final.get("test_accuracy"),
            final_test_loss=final.get("test_loss"),
            final_leader_test_accuracy=final.get("leader_test_accuracy"),  # LSGD only, like the center's
            final_leader_test_loss=final.get("leader_test_loss"),
            final_center_test_accuracy=final.get("center_test_accuracy"),
            final_center_test_loss=final.get("center_test_loss"),
            leader=final.get("leader", status.get("leader", -1)),
            steps_per_worker=max((s["steps"] for s in stats), default=0),
            samples=sum(s["steps"] for s in stats) * self.config.batch_size,
            history=self.history,
            timings=timings,
            communication=communication_summary(stats, getattr(self, "weight_bytes", 0), status),
            leader_counts=status.get("leader_counts", []),
            leader_changes=status.get("leader_changes", []),
            events=status.get("events", []),
            checkpoints=self.checkpoints,
            resumed_from=self.resumed_from,
            topology=[
                {k: g[k] for k in ("group", "node_id", "node_ip", "pid", "workers")}
                for g in getattr(self, "group_infos", [])
            ],
            config=self.config.to_dict(),
            error=error,
            divergence=self._watch.found.to_dict() if self._watch.found else None,
        )
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, "result.json"), result.to_dict())
        if error is None:
            print(summary_lines(result), flush=True)  # even when quiet: it says where the results are
            if self._watch.found:
                opt = self.config.optimizer
                print(f"lsgd-ray: {divergence_line(result, self._watch.found, opt.lr, opt.name)}", flush=True)
        return result

    def _save_leader_weights(self) -> None:
        weights = ray.get(self.leader_weights_ref())
        model = load_flat(self.model_factory(), weights)
        path = os.path.join(self.output_dir, "leader_state_dict.pt")
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
