"""The driver's schedule of evaluations, checkpoints and the end of the budget (both loops use it)."""

import math

from lsgd_ray._internal.schedule import Schedule


def test_the_driver_wakes_at_the_nearest_deadline_and_never_waits_a_negative_time():
    s = Schedule(eval_every_s=5.0, time_budget_s=12.0, checkpoint_every_s=3.0)
    s.evaluated(0.0)
    assert s.wait_s(0.0) == 3.0  # the time-based checkpoint comes first
    s.checkpointed(step=10, train_s=3.0)
    assert s.wait_s(3.5) == 1.5  # then the evaluation at 5 s
    s.evaluated(5.0)
    assert s.wait_s(5.0) == 1.0  # the next checkpoint, 3 s after the last
    assert s.wait_s(6.5) == 0.0  # overdue: at once, never negative
    s.checkpointed(step=20, train_s=6.5)
    assert s.wait_s(9.0) == 0.5  # the budget's end at 12 s comes after the checkpoint at 9.5 s
    assert Schedule(eval_every_s=5.0, time_budget_s=12.0).wait_s(11.0) == 0.0  # overdue evaluation
    late = Schedule(eval_every_s=100.0, time_budget_s=12.0)
    late.evaluated(0.0)
    assert late.wait_s(11.0) == 1.0 and late.wait_s(13.0) == 0.0  # the budget's end, then at once


def test_steps_pause_at_the_next_step_checkpoint_and_the_run_ends_at_either_limit():
    s = Schedule(eval_every_s=1.0, max_step=100, checkpoint_every_steps=16)
    assert s.step_limit() == 16 and s.checkpointing
    assert not s.checkpoint_due(15, 0.0) and s.checkpoint_due(16, 0.0)
    s.checkpointed(16, 2.0)
    assert s.step_limit() == 32 and not s.checkpoint_due(31, 9.0)
    s.checkpointed(96, 9.0)
    assert s.step_limit() == 100  # the end of the run comes before the next checkpoint
    assert not s.finished(99, 1e9) and s.finished(100, 0.0)  # no time budget: steps only
    timed = Schedule(eval_every_s=1.0, time_budget_s=10.0)
    assert timed.step_limit() == math.inf and not timed.checkpointing
    assert not timed.finished(10**9, 9.9) and timed.finished(0, 10.0)
    assert not timed.checkpoint_due(10**9, 1e9)  # nothing asked: never due


def test_an_evaluation_sets_the_next_one_or_asks_for_one_at_once():
    s = Schedule(eval_every_s=4.0)
    s.evaluated(1.0)
    assert not s.evaluation_due(4.9) and s.evaluation_due(5.0)
    s.evaluated(5.0, now_again=True)  # an evaluation that ends the run: the loop stops next turn
    assert s.evaluation_due(5.0) and s.wait_s(5.0) == 0.0
