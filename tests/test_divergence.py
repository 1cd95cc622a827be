"""Every algorithm trains the bundled digits with its defaults, and a run that diverges, collapses
or learns nothing says so: a warning while it goes on, status "diverged" with the evidence in
result.json, a TensorBoard marker, a closing line with advice and, on request, an early stop."""

import functools
import json
import math

import pytest
import ray

from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig, Trainer
from lsgd_ray.cli import main
from lsgd_ray.data import synthetic
from lsgd_ray.divergence import Divergence, DivergenceWatch
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (16,), 4, hidden=32)
DATA = functools.partial(synthetic, n_train=1024, n_test=512)
LN10 = math.log(10)


def record(step, accuracy, loss=1.0, finite=True):
    return {
        "step": step,
        "train_s": step / 10,
        "evaluated": "center",
        "test_accuracy": accuracy,
        "test_loss": loss,
        "weights_finite": finite,
    }


# ------------------------------------------------------------------ the rules, without Ray


def test_a_training_run_shows_no_sign():
    watch = DivergenceWatch(chance=0.1, constant_loss=LN10, min_steps=20)
    for step, accuracy, loss in [(0, 0.09, 2.31), (10, 0.12, 2.30), (30, 0.6, 1.2), (60, 0.9, 0.3), (90, 0.88, 0.35)]:
        assert watch.check(record(step, accuracy, loss)) is None
    assert watch.found is None and watch.best == 0.9


@pytest.mark.parametrize(
    "rec, evidence",
    [
        (record(40, 0.1, float("nan")), "test loss is nan"),
        (record(40, 0.1, float("inf")), "test loss is inf"),
        (record(40, 0.8, 0.5, finite=False), "its weights hold NaN or infinite values"),
    ],
)
def test_non_finite_loss_or_weights_is_divergence(rec, evidence):
    watch = DivergenceWatch(chance=0.1)
    found = watch.check(rec)
    assert found == Divergence("non-finite", 40, 4.0, "center", evidence)
    assert found.warning() == f"lsgd-ray: warning: center diverged at step 40: {evidence}"


def test_accuracy_back_at_chance_after_well_above_is_a_collapse():
    watch = DivergenceWatch(chance=0.1)  # well above: 0.325; at chance: 0.145
    assert watch.check(record(10, 0.33)) is None
    assert watch.check(record(20, 0.15)) is None  # low, but not at chance
    found = watch.check(record(30, 0.0864, 2.31))
    assert found.kind == "collapse" and found.step == 30
    assert found.evidence == "test accuracy 0.0864 (chance 0.1000) after 0.3300; test loss 2.3100"
    assert watch.check(record(40, 0.08)) is None  # the first sign only
    assert watch.found is found


def test_at_chance_without_having_been_well_above_is_not_a_collapse():
    watch = DivergenceWatch(chance=0.1, constant_loss=LN10, min_steps=20)
    assert watch.check(record(10, 0.3, 2.0)) is None
    assert watch.check(record(15, 0.1, 2.4)) is None  # before two epochs: maybe still starting


def test_at_chance_and_no_better_than_a_constant_after_two_epochs_is_dead():
    watch = DivergenceWatch(chance=0.1, constant_loss=LN10, min_steps=20)
    assert watch.check(record(20, 0.1, 1.9)) is None  # at chance but its loss went down: learning
    found = watch.check(record(30, 0.0836, 2.3179))
    assert found.kind == "dead" and found.describe() == "learned nothing"
    assert "test loss 2.3179 after 30 steps (a constant answer: 2.3026)" in found.evidence


def test_a_resumed_watch_remembers_the_best_accuracy_and_the_sign():
    watch = DivergenceWatch(chance=0.25)
    watch.resume([record(10, 0.9), record(20, 0.5)], None)
    assert watch.best == 0.9 and watch.check(record(30, 0.26)).kind == "collapse"
    again = DivergenceWatch(chance=0.25)
    again.resume([], watch.found.to_dict())
    assert again.found == watch.found and again.check(record(40, float("nan"))) is None


# ------------------------------------------------------------------ on a local Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("algorithm", ["lsgd", "easgd", "downpour", "data_parallel", "local_sgd", "dpsgd", "aldsgd"])
def test_every_algorithm_trains_the_digits_with_its_defaults(local_ray, tmp_path, algorithm, capsys):
    """The README's main job (2 x 2 workers, the digits, the default optimizer), a short budget."""
    out = tmp_path / algorithm
    argv = ["train", "--algorithm", algorithm, "--time-budget", "8", "--eval-every", "4", "--quiet"]
    assert main([*argv, "--output-dir", str(out)]) == 0, capsys.readouterr()
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["divergence"] is None
    assert result["final_test_accuracy"] > 0.9, result["history"]


def diverging(tmp_path, mode, **kw):
    """LSGD with a learning rate no network survives: its weights overflow within steps."""
    return TrainConfig(
        num_groups=2,
        workers_per_group=2,
        batch_size=32,
        max_steps=400,
        eval_every_s=0.3,
        optimizer=OptimizerConfig(lr=1e4),
        lsgd=LSGDConfig(mode=mode, evaluate="center"),
        straggler_delay_s={r: 0.005 for r in range(4)},
        output_dir=str(tmp_path / mode),
        quiet=True,
        **kw,
    )


@pytest.mark.timeout(180)
def test_a_diverging_sync_run_goes_on_and_says_so(local_ray, tmp_path, capsys):
    cfg = diverging(tmp_path, "sync")
    with Trainer(MODEL, DATA, cfg) as trainer:
        result = trainer.fit()
    out, err = capsys.readouterr()
    assert result.status == "diverged" and result.steps_per_worker == 400  # it went on to the end
    found = result.divergence
    assert found["kind"] == "non-finite" and found["model"].startswith("center") and found["step"] > 0
    warnings = [line for line in err.splitlines() if line.startswith("lsgd-ray: warning: center")]
    assert len(warnings) == 1, err
    assert (
        f"diverged at step {found['step']}" in warnings[0]
        and f"diverged at step {found['step']}" in out
        and "Try a lower learning rate than 10000" in out
    )
    saved = json.loads((tmp_path / "sync" / "result.json").read_text())
    assert saved["status"] == "diverged" and saved["divergence"] == found
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "sync" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("run/diverged")] == [1.0]
    assert "run/diverged/text_summary" in events.Tags()["tensors"]


@pytest.mark.timeout(180)
def test_a_diverging_async_run_stops_at_the_first_sign_when_asked(local_ray, tmp_path):
    cfg = diverging(tmp_path, "async", stop_on_divergence=True)
    with Trainer(MODEL, DATA, cfg) as trainer:
        result = trainer.fit()
    assert result.status == "diverged" and result.divergence["kind"] == "non-finite"
    assert result.steps_per_worker < 400  # stopped early
    assert json.loads((tmp_path / "async" / "result.json").read_text())["status"] == "diverged"


@pytest.mark.timeout(180)
def test_the_cli_reports_a_diverged_run_and_exits_with_status_1(local_ray, tmp_path, capsys):
    """DOWNPOUR by the papers' rule (--downpour-rule sum) at a learning rate no network survives.
    (With the defaults the sum rule died on the digits in some runs and not in others, 0.30-0.48
    after 8 s: whether it collapses is timing, so it is measured in docs/divergence.md, not here.)"""
    out = tmp_path / "sum"
    argv = ["train", "--algorithm", "downpour", "--downpour-rule", "sum", "--lr", "1e4", "--time-budget", "8"]
    assert main([*argv, "--eval-every", "1", "--quiet", "--stop-on-divergence", "--output-dir", str(out)]) == 1
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["divergence"]["kind"] == "non-finite", result["history"]
    assert result["config"]["downpour"]["rule"] == "sum"
    assert "lsgd-ray: the parameter server diverged at step" in capsys.readouterr().out
