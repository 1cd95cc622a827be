"""What every configuration check shares: ``ConfigError``, the valid names, and the checks
that phrase a refusal (what to change, and what was given)."""

from __future__ import annotations

import math
import os
from typing import Any

MODES = ("sync", "async")
LEADER_ESTIMATES = ("train_loss", "val_batch")
EVALUATED_MODELS = ("leader", "center")  # LSGD: which model test_accuracy, the progress line and a target use
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
GRADIENT_COMPRESSIONS = ("none", "powersgd", "bf16")  # data-parallel SGD (DataParallelConfig)
COMM_DTYPES = ("float32", "bfloat16")  # how weights travel (lsgd_ray.flat.encode)
DOWNPOUR_RULES = ("mean", "sum")  # how the server applies a push: scaled by 1/W, or added whole


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Refuse an unknown name, listing the valid ones."""
    _check(value in valid, f"unknown {kind} {value!r}; choose one of: {', '.join(valid)}")


def _got(value: Any) -> str:
    """``value`` for a message, with its type when the type is what is wrong (a str, a bool...)."""
    return repr(value) if _is_number(value) else f"{value!r} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    """An int or a float. Not a bool: Python counts True as 1, but nobody means a number by it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(name: str, value: float) -> None:
    _check(
        _is_number(value) and 0.0 <= value <= 1.0,
        f"{name} must be in [0, 1] (it is the fraction of the distance to the leader "
        f"covered by one pull), got {_got(value)}",
    )


def _check_positive_int(name: str, value: Any) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {_got(value)}",
    )


def _check_number(name: str, value: Any, op: str = ">", bound: float = 0.0, what: str = "") -> None:
    """A finite number ``> bound`` (``op=">="``: or equal to it); ``what`` adds e.g. " of seconds"."""
    above = _is_number(value) and math.isfinite(value) and (value > bound if op == ">" else value >= bound)
    _check(above, f"{name} must be {op} {bound:g} (a finite number{what}), got {_got(value)}")


def _check_optional_path(name: str, value: Any) -> None:
    _check(
        value is None or (isinstance(value, (str, os.PathLike)) and str(value) != ""),
        f"{name} must be a non-empty path (a str) or None, got {_got(value)}",
    )


def _check_bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), f"{name} must be True or False, got {_got(value)}")
