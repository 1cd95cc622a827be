"""The algorithm table (``lsgd_ray/algorithms/registry.py``): every row is complete and is
what the config, the CLI, the Trainer and the byte theory use. No Ray."""

import argparse
import math

import pytest

from lsgd_ray import TrainConfig
from lsgd_ray._internal.coordinator import Coordinator
from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.cli import build_parser, config_from_args
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


def _another_value(row, f):
    """A value for ``row``'s flag ``f`` other than its default (and valid for its settings)."""
    parser = argparse.ArgumentParser()
    row.add_flags(parser)
    default = getattr(parser.parse_args([]), f.dest)
    if f.options.get("choices"):
        return next(c for c in f.options["choices"] if c != default)
    if f.options.get("type") is int:
        return default + 1
    return default / 2 if default else 0.05


@pytest.mark.parametrize("name", sorted({row.name for row in ALGORITHMS.values() if row.flags}))
def test_each_rows_own_flags_reach_its_settings_and_nothing_else(name):
    """Every flag a row declares, given alone with another value than its default, is what its
    settings hold; the other algorithms' settings keep their defaults."""
    row = ALGORITHMS[name]
    defaults = TrainConfig(algorithm=name, max_steps=1)
    for f in row.flags:
        value = _another_value(row, f)
        argv = ["train", "--algorithm", name, "--max-steps", "1", "--" + f.dest.replace("_", "-"), str(value)]
        config = config_from_args(build_parser().parse_args(argv))
        settings = row.settings_of(config)
        # diloco's --outer-* flags make its outer optimizer
        held = getattr(settings, f.field) if hasattr(settings, f.field) else getattr(settings.outer, f.field[6:])
        assert held == value, (f.dest, held, value)
        for other in {r.settings for r in ALGORITHMS.values()} - {row.settings, None}:
            assert getattr(config, other) == getattr(defaults, other), (f.dest, other)


def test_flags_given_nowhere_make_the_settings_defaults_and_shared_ones_reach_who_has_them():
    parse = build_parser().parse_args
    for name, row in ALGORITHMS.items():
        config = config_from_args(parse(["train", "--algorithm", name, "--max-steps", "1"]))
        kind = row.settings_type()
        if kind is not None:
            assert row.settings_of(config) == kind(), name
    config = config_from_args(parse(["train", "--algorithm", "easgd", "--tau", "3", "--mode", "async"]))
    assert (config.easgd.tau, config.easgd.mode) == (3, "async")
    config = config_from_args(parse(["train", "--algorithm", "diloco", "--tau-global", "32", "--tau", "8"]))
    assert (config.diloco.tau_global, config.diloco.tau) == (32, 8)
