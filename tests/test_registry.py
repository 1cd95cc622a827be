"""The algorithm table (``lsgd_ray/algorithms/registry.py``): every row is complete and is
what the config, the CLI, the Trainer and the byte theory use. No Ray."""

import math

import pytest

from lsgd_ray import TrainConfig
from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.cli import build_parser
from lsgd_ray.config import EASGDConfig, LSGDConfig


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_row_names_a_coordinator_a_mode_a_summary_and_a_theory(name):
    row = ALGORITHMS[name]
    config = TrainConfig(algorithm=name, max_steps=8)
    assert issubclass(row.coordinator_class(), Coordinator)
    assert config.mode in ("sync", "async") and row.summary(config)
    if config.mode == "async":
        assert row.async_report_period(config) >= 1
    theory = expected_bytes(config, 1000, [2, 2])
    assert theory["received"] > 0 and math.isfinite(theory["received"])


def test_the_modes_follow_the_settings_where_an_algorithm_has_both():
    assert TrainConfig(algorithm="lsgd", max_steps=1, lsgd=LSGDConfig(mode="async")).mode == "async"
    assert TrainConfig(algorithm="easgd", max_steps=1, easgd=EASGDConfig(mode="async")).mode == "async"
    assert TrainConfig(algorithm="downpour", max_steps=1).mode == "async"  # its only mode
    with pytest.raises(ValueError, match="no asynchronous mode"):
        ALGORITHMS["local_sgd"].async_report_period(TrainConfig(algorithm="local_sgd", max_steps=1))


def test_lsgd_bytes_per_worker_step_by_hand():
    """S = 100, groups [2, 2], tau 4, tau_G 8: each group's follower gets a local pull every 4
    steps (2 of 4 workers), 3 of 4 workers a global pull every 8: 100 * (2/4/4 + 3/4/8)."""
    config = TrainConfig(algorithm="lsgd", max_steps=1, lsgd=LSGDConfig(tau=4, tau_global=8))
    assert expected_bytes(config, 100, [2, 2])["received"] == pytest.approx(100 * (2 / 4 / 4 + 3 / 4 / 8))
    # one group: its leader is the global leader, so no separate local pulls are counted
    assert expected_bytes(config, 100, [4])["received"] == pytest.approx(100 * 3 / 4 / 8)


def test_the_cli_takes_every_registered_algorithm_and_no_other():
    train = build_parser().parse_args(["train", "--algorithm", "dpsgd", "--max-steps", "1"])
    assert train.algorithm == "dpsgd"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--algorithm", "not-registered", "--max-steps", "1"])
    for name in ALGORITHMS:
        assert build_parser().parse_args(["train", "--algorithm", name, "--max-steps", "1"]).algorithm == name
