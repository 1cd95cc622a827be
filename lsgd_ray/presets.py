"""Named settings that reproduce a published configuration.

``preset_config("reference-lsgd", time_budget_s=600)`` is the ``TrainConfig`` the LSGD authors'
code runs, with anything you pass on top; ``lsgd-ray --preset reference-lsgd`` the same from the
command line (flags given explicitly win). The numbers and where they come from are in each
preset's ``source`` and in docs/algorithms.md ("Presets").

What a preset does not fix: the budget (the reference stops on wall-clock time: give
``time_budget_s``, ``epochs`` or ``max_steps``), the layout (groups x workers: the paper ran
nodes of four GPUs) and the learning rate, which the reference picks per method from
{0.1, 0.01, 0.001} (ours defaults to 0.05; tune it the same way for every contender).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lsgd_ray.config import ConfigError, TrainConfig, nested_config_classes

# The reference's local optimizer and batch, shared by its LSGD and EASGD runs.
_REFERENCE_OPTIMIZER = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str  # one line
    source: str  # where the numbers come from
    settings: dict[str, Any]  # TrainConfig fields; a nested config as a dict of its fields


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "reference-lsgd",
            "LSGD as the authors' code runs it: synchronous, λ = λ_G = 0.1, proximal pull 0.1, τ = τ_G/4, "
            "center evaluated, shards re-dealt each epoch",
            "github.com/yunfei-teng/LSGD (2021 version): all pulling strengths 0.1 in its launch script, "
            "l_comm = g_comm/4 with g_comm from {4, 16, 64} (16 here), the proximal pull on by default for "
            "LSGD, leader = lowest mean training loss over the last 10 batches, the center (mean of the "
            "workers) tested, DistributedSampler with set_epoch, Nesterov SGD momentum 0.9, weight decay "
            "1e-4, batch 128 per worker",
            {
                "algorithm": "lsgd",
                "lsgd": {
                    "lam": 0.1,
                    "lam_global": 0.1,
                    "tau": 4,
                    "tau_global": 16,
                    "mode": "sync",
                    "leader_estimate": "train_loss",
                    "loss_window": 10,
                    "proximal": 0.1,
                    "evaluate": "center",
                },
                "optimizer": _REFERENCE_OPTIMIZER,
                "batch_size": 128,
                "redeal_shards": True,
            },
        ),
        Preset(
            "reference-easgd",
            "EASGD as the LSGD authors' code runs it as their baseline: synchronous, moving rate 0.43, "
            "shards re-dealt each epoch",
            "github.com/yunfei-teng/LSGD: EASGD with moving rate 0.43 in its launch script, the same "
            "optimizer, batch and sampler as its LSGD; the period τ = 4 is lsgd-ray's default (the "
            "facts gathered do not fix it; REFERENCES.md)",
            {
                "algorithm": "easgd",
                "easgd": {"alpha": 0.43, "tau": 4, "mode": "sync"},
                "optimizer": _REFERENCE_OPTIMIZER,
                "batch_size": 128,
                "redeal_shards": True,
            },
        ),
    )
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of preset ``name`` with ``overrides`` on top: TrainConfig fields; a
    nested config as a dict of some of its fields (merged into the preset's, e.g.
    ``lsgd={"tau_global": 64}``) or as a whole config object (replacing it)."""
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of: {', '.join(sorted(PRESETS))}, got {name!r}")
    nested = nested_config_classes()
    values: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in PRESETS[name].settings.items()}
    for key, value in overrides.items():
        if key in nested and isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    for key, kind in nested.items():
        if isinstance(values.get(key), dict):
            try:
                values[key] = kind(**values[key])
            except TypeError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# The command line's flags a preset may set, and the TrainConfig field behind each ("*": the field of the
# preset algorithm's own settings, e.g. lsgd.tau or easgd.tau: the registry's SHARED_FLAGS); with the flags
# each algorithm's row in lsgd_ray.algorithms.registry declares (``--lam``: lsgd.lam).
_PRESET_FLAGS = {
    "algorithm": "algorithm",
    "batch_size": "batch_size",
    "redeal_shards": "redeal_shards",
    "optimizer": "optimizer.name",
    "lr": "optimizer.lr",
    "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
}


def flag_defaults(name: str) -> dict[str, object]:
    """The ``lsgd-ray train`` flags' defaults (argparse names) under preset ``name``."""
    from lsgd_ray.algorithms import ALGORITHMS
    from lsgd_ray.algorithms.registry import SHARED_FLAGS

    settings = PRESETS[name].settings
    own = ALGORITHMS[settings["algorithm"]].settings or ""
    flags = {**_PRESET_FLAGS, **{shared: f"*.{shared}" for shared in SHARED_FLAGS}}
    flags.update({f.dest: f"{row.settings}.{f.field}" for row in ALGORITHMS.values() for f in row.flags})
    defaults: dict[str, object] = {}
    for dest, path in flags.items():
        section, _, key = path.rpartition(".")
        section = own if section == "*" else section
        values = settings.get(section, {}) if section else settings
        if key in values:
            defaults[dest] = values[key]
    if "nesterov" in settings.get("optimizer", {}):
        defaults["no_nesterov"] = not settings["optimizer"]["nesterov"]
    return defaults
