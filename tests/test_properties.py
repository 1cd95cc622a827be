"""Bad input at random (hypothesis): any configuration, nested configuration or command line
either is accepted or is refused with a ``ConfigError`` (the CLI: one ``error:`` line, exit 2)
that names a field or a flag; never another exception, never a traceback. No Ray: accepted
inputs are built into what ``fit`` receives (``cli.prepare``), the runs themselves are covered
by the other tests. Each test counts the inputs it tried and checks it tried them all."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsgd_ray.cli import build_parser, parse_args, prepare
from lsgd_ray.config import (
    ConfigError,
    DataParallelConfig,
    DiLoCoConfig,
    DownpourConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
)
from lsgd_ray.data import DatasetNotFoundError
from lsgd_ray.topology import PlacementError

EXAMPLES = 400
NESTED = [
    LSGDConfig,
    EASGDConfig,
    DownpourConfig,
    LocalSGDConfig,
    GossipConfig,
    DiLoCoConfig,
    DataParallelConfig,
    OptimizerConfig,
]
CONFIGS = [*NESTED, TrainConfig]
FIELDS = {f.name for cls in CONFIGS for f in dataclasses.fields(cls)}
NAMES = [  # words that choices accept, so some draws are valid
    "sync", "async", "leader", "center", "val_batch", "loss", "mean", "sum", "ring", "torus",
    "complete", "random", "matchings", "none", "sgd", "adam", "adamw", "lsgd", "easgd", "dpsgd", "diloco", "powersgd", "bf16",
]  # fmt: skip
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.integers(0, 64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
    st.sampled_from(NAMES),
    st.text(max_size=8),
    st.lists(st.integers(-2, 4), max_size=3),
    st.dictionaries(st.integers(-2, 5), st.one_of(st.floats(-1, 1), st.text(max_size=2)), max_size=3),
)
tried: dict[str, int] = {}


def _refused_naming_a_field(exc: ConfigError) -> None:
    message = str(exc)
    assert message and "\n" not in message, message
    assert any(name in message for name in FIELDS), message


def _near(default) -> st.SearchStrategy:
    """Values of the kind a field's default is (so many configs pass), anything at all sometimes."""
    if isinstance(default, bool):
        kind = st.booleans()
    elif isinstance(default, int):
        kind = st.integers(-2, 64)
    elif isinstance(default, float):
        kind = st.one_of(st.floats(-0.5, 2.0), st.floats(0.0, 100.0))
    elif isinstance(default, str):
        kind = st.sampled_from([default, *NAMES])
    elif isinstance(default, dict):
        kind = st.dictionaries(st.integers(-1, 8), st.floats(-0.1, 1.0), max_size=3)
    else:  # None: an optional number, a path or a name
        kind = st.one_of(st.none(), st.integers(1, 64), st.floats(0.01, 50.0), st.text("abc/", min_size=1, max_size=4))
    return st.integers(0, 3).flatmap(lambda k: ANY if k == 0 else kind)


def _kwargs(fields: list) -> st.SearchStrategy:
    names = st.sampled_from([f.name for f in fields])
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in fields}
    return st.lists(names.flatmap(lambda n: st.tuples(st.just(n), _near(defaults[n]))), max_size=4).map(dict)


def _nested_kwargs(cls: type) -> st.SearchStrategy:
    return _kwargs(list(dataclasses.fields(cls)))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(NESTED).flatmap(lambda cls: st.tuples(st.just(cls), _nested_kwargs(cls))))
def test_any_nested_config_is_built_or_refused_naming_its_field(case):
    cls, kwargs = case
    tried["nested"] = tried.get("nested", 0) + 1
    try:
        cls(**kwargs)
    except ConfigError as exc:
        _refused_naming_a_field(exc)


TRAIN_FIELDS = [
    f
    for f in dataclasses.fields(TrainConfig)
    if f.default_factory is dataclasses.MISSING or not dataclasses.is_dataclass(f.default_factory())
]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_kwargs(TRAIN_FIELDS), st.booleans())
def test_any_train_config_is_built_or_refused_naming_its_field(kwargs, with_budget):
    tried["train"] = tried.get("train", 0) + 1
    if with_budget:
        kwargs.setdefault("max_steps", 8)
    try:
        config = TrainConfig(**kwargs)
    except ConfigError as exc:
        _refused_naming_a_field(exc)
        return
    assert config.mode in ("sync", "async")  # what the Trainer asks first of an accepted config


def _train_actions() -> list:
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    return [a for a in train._actions if a.option_strings and a.option_strings[0] != "-h"]


VALUES = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([*NAMES, "digits", "synthetic", "mnist", "imagenet", "cnn7", "mlp", "crop28-flip", "0", "-0.5"]),
    st.text(alphabet="abc01-./ ", max_size=6),
)


def _value_for(action) -> st.SearchStrategy:
    """Mostly what the flag's type takes (so most lines reach the configs' own checks), with
    anything at all sometimes; ``None``: the flag alone (a switch)."""
    if action.nargs == 0:
        return st.one_of(st.none(), st.none(), VALUES)
    if action.choices:
        typed = st.sampled_from([str(c) for c in action.choices])
    elif action.type is int:
        typed = st.integers(-3, 200).map(str)
    elif action.type is float:
        typed = st.one_of(st.floats(-2.0, 2.0).map(repr), st.sampled_from(["nan", "inf", "-inf", "1e9", "0"]))
    else:
        typed = VALUES
    return _mostly(typed, st.one_of(VALUES, st.none()))


def _mostly(likely: st.SearchStrategy, rarely: st.SearchStrategy) -> st.SearchStrategy:
    """``likely`` nine times in ten."""
    return st.integers(0, 9).flatmap(lambda k: rarely if k == 0 else likely)


FLAG_VALUES = st.one_of(
    *[
        st.tuples(st.just(a.option_strings[-1]), _value_for(a))
        for a in _train_actions()
        if a.option_strings[-1].startswith("--")
    ]
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FLAG_VALUES, max_size=5))
def test_any_command_line_is_taken_or_refused_in_one_line(pairs):
    tried["cli"] = tried.get("cli", 0) + 1
    argv = ["train", "--dataset", "digits", "--max-steps", "4"]
    for flag, value in pairs:
        argv += [flag] if value is None else [flag, value]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_args(argv)  # as main does (--preset: a second pass with its defaults)
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines()
        assert exc.code == 2 and len(lines) == 1 and "error:" in lines[0], (argv, err.getvalue())
        return
    try:
        model, data, config = prepare(args)
    except (ConfigError, DatasetNotFoundError, PlacementError) as exc:
        message = str(exc)
        assert message and "\n" not in message, (argv, message)
        return
    assert callable(model) and callable(data) and math.isfinite(config.batch_size)


def test_every_property_test_tried_all_its_inputs():
    """Runs after the three above (pytest keeps a module's order): the counts, for the docs."""
    assert tried == {"nested": EXAMPLES, "train": EXAMPLES, "cli": EXAMPLES}, tried
