"""When the driver acts during training: evaluate, checkpoint, stop. One schedule serves the
synchronous and the asynchronous loop alike, in training seconds (the clock budgets count) and
steps per worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

ASYNC_POLL_S = 1.0  # asynchronous runs: how often at least the driver looks at the loops and the step count
POSTPONE_S = 1e-3  # an evaluation postponed: training seconds before it is due again (one round at least)


@dataclass
class Schedule:
    eval_every_s: float
    time_budget_s: float | None = None
    max_step: float = math.inf  # steps per worker; set when the shards' sizes are known
    checkpoint_every_s: float | None = None
    checkpoint_every_steps: int | None = None
    next_eval_s: float = 0.0
    checkpoint_s: float = 0.0  # training seconds at the last checkpoint
    checkpoint_step: int = 0  # steps per worker at the last checkpoint

    @property
    def checkpointing(self) -> bool:
        return bool(self.checkpoint_every_steps or self.checkpoint_every_s)

    def time_left(self, train_s: float) -> float:
        return math.inf if self.time_budget_s is None else self.time_budget_s - train_s

    def finished(self, step: int, train_s: float) -> bool:
        """The budget is spent: the step limit reached or the time budget used up."""
        return step >= self.max_step or self.time_left(train_s) <= 0

    def wait_s(self, train_s: float) -> float:
        """Training seconds until the next evaluation, time-based checkpoint or end of budget."""
        until = [self.next_eval_s - train_s, self.time_left(train_s)]
        if self.checkpoint_every_s:
            until.append(self.checkpoint_s + self.checkpoint_every_s - train_s)
        return max(min(until), 0.0)

    def step_limit(self) -> float:
        """Steps per worker at which training must pause next: the next step-based checkpoint
        or the end of the run."""
        if self.checkpoint_every_steps:
            return min(self.max_step, self.checkpoint_step + self.checkpoint_every_steps)
        return self.max_step

    def evaluation_due(self, train_s: float) -> bool:
        return train_s >= self.next_eval_s

    def evaluated(self, train_s: float, now_again: bool = False) -> None:
        """An evaluation just ended; ``now_again``: the next one is due at once."""
        self.next_eval_s = train_s + (0.0 if now_again else self.eval_every_s)

    def postponed(self, train_s: float) -> None:
        """An evaluation that could not be made now: the next one is due after one more
        synchronous round (rounds run while training seconds are left before it)."""
        self.next_eval_s = train_s + POSTPONE_S

    def checkpoint_due(self, step: int, train_s: float) -> bool:
        by_steps = self.checkpoint_every_steps and step >= self.checkpoint_step + self.checkpoint_every_steps
        by_time = self.checkpoint_every_s and train_s >= self.checkpoint_s + self.checkpoint_every_s
        return bool(by_steps or by_time)

    def checkpointed(self, step: int, train_s: float) -> None:
        self.checkpoint_step, self.checkpoint_s = step, train_s
