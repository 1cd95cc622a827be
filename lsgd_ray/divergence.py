"""Telling a run that diverged or collapsed from one that trains.

Three signs, looked for in the evaluated model at every evaluation:

- "non-finite": its test loss or its weights hold NaN or infinity;
- "collapse": its test accuracy fell back to chance after it had been well above it;
- "dead": after ``min_steps`` (two epochs) it is at chance and its test loss is no lower than
  that of the best constant answer (the entropy of the test labels, ln 10 for ten balanced
  classes): it has learned nothing. A network can die before any evaluation sees it well above
  chance: DOWNPOUR's summed updates on the digits, evaluated every second, peaked at 0.33 and
  sat at 0.08 with test loss 2.31 from then on.

Chance is the accuracy of always answering the test set's most common class. The first sign is
kept; the run goes on unless asked to stop (``TrainConfig.stop_on_divergence``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Fractions of the way from chance to a perfect score: "well above chance" is at least
# WELL_ABOVE of it, "at chance" at most AT_CHANCE of it (10 balanced classes: 0.325 and 0.145).
WELL_ABOVE = 0.25
AT_CHANCE = 0.05
# "No lower than the constant answer's loss", with room for rounding and a few lucky batches.
CONSTANT_LOSS_MARGIN = 0.98


@dataclass(frozen=True)
class Divergence:
    """The first sign that a run diverged: where, in which model, and what was seen."""

    kind: str  # "non-finite", "collapse" or "dead"
    step: int
    train_s: float
    model: str  # what was evaluated ("leader", "center", "parameter server"...)
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self) -> str:
        """The one line printed when it is seen."""
        return f"lsgd-ray: warning: {self.model} {self.describe()} at step {self.step}: {self.evidence}"

    def describe(self) -> str:
        return {"non-finite": "diverged", "collapse": "collapsed to chance"}.get(self.kind, "learned nothing")


class DivergenceWatch:
    """Looks at each evaluation in turn; ``check`` returns the first sign once, then None."""

    def __init__(self, chance: float, constant_loss: float = math.inf, min_steps: float = math.inf) -> None:
        self.chance, self.constant_loss, self.min_steps = chance, constant_loss, min_steps
        self.best = 0.0
        self.found: Divergence | None = None

    def resume(self, history: list[dict[str, Any]], found: dict[str, Any] | None) -> None:
        """Continue from a checkpoint: its evaluations so far and the sign it had seen, if any."""
        self.best = max((h["test_accuracy"] for h in history), default=0.0)
        self.found = Divergence(**found) if found else None

    def well_above(self) -> float:
        return self.chance + WELL_ABOVE * (1.0 - self.chance)

    def at_chance(self) -> float:
        return self.chance + AT_CHANCE * (1.0 - self.chance)

    def check(self, record: dict[str, Any]) -> Divergence | None:
        """``record`` is one evaluation (``step``, ``train_s``, ``evaluated``, ``test_loss``,
        ``test_accuracy``, ``weights_finite``)."""
        if self.found is not None:
            return None
        evidence = self._evidence(record)
        self.best = max(self.best, record["test_accuracy"])
        if evidence is None:
            return None
        kind, text = evidence
        self.found = Divergence(kind, int(record["step"]), float(record["train_s"]), str(record["evaluated"]), text)
        return self.found

    def _evidence(self, record: dict[str, Any]) -> tuple[str, str] | None:
        loss, accuracy = record["test_loss"], record["test_accuracy"]
        if not record.get("weights_finite", True):
            return "non-finite", "its weights hold NaN or infinite values"
        if not math.isfinite(loss):
            return "non-finite", f"test loss is {loss}"
        if accuracy > self.at_chance():
            return None
        at = f"test accuracy {accuracy:.4f} (chance {self.chance:.4f})"
        if self.best >= self.well_above():
            return "collapse", f"{at} after {self.best:.4f}; test loss {loss:.4f}"
        if record["step"] >= self.min_steps and loss >= CONSTANT_LOSS_MARGIN * self.constant_loss:
            return (
                "dead",
                f"{at}, test loss {loss:.4f} after {record['step']} steps (a constant answer: {self.constant_loss:.4f})",
            )
        return None


def divergence_line(result: Any, found: Divergence, lr: float, optimizer: str) -> str:
    """The closing line of a run that diverged: what, where, and what to change."""
    return (
        f"the {found.model} {found.describe()} at step {found.step} ({found.evidence}); "
        f'result.json says status "{result.status}". Try a lower learning rate than {lr:g} (--lr) '
        f"or another optimizer than {optimizer} (--optimizer)"
    )
