"""Bad input, and what each gets: the one table of every refused value.

Each row: what is wrong, the input (a config built with these fields, a command line, a data
directory, a run on a cluster that cannot hold it), the error raised and a regex its message
must match. The messages are meant to be acted on: they name the field (or flag), the bad value,
and what is allowed. Every row is refused within ``WITHIN_S`` seconds, before any actor starts.
The placement rows ask a real local Ray (2 CPUs, no GPU); when its CPUs are held by others the
trainer first gives them ``AVAILABILITY_GRACE_S`` to free up (a run that just ended).

Command lines run ``lsgd_ray.cli.main`` as ``python -m lsgd_ray`` does: exit code 2 and one
line on stderr, no traceback. ``{tmp}`` stands for a fresh empty directory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import ray

from lsgd_ray import PlacementError, fit
from lsgd_ray._internal.driver.placement import AVAILABILITY_GRACE_S
from lsgd_ray.cli import main
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
from lsgd_ray.data import DatasetNotFoundError, dataset_factory, synthetic
from lsgd_ray.models import mlp, model_factory

NAN, INF = float("nan"), float("inf")
WITHIN_S = 5.0  # every row, placement included, is refused this fast


class CliExit(Exception):
    """A command line that did not succeed: its exit code and what it wrote on stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(stderr)
        self.code, self.stderr = code, stderr


@dataclass(frozen=True)
class Config:
    """``cls(**defaults, **fields)``: ``fields`` are what the row is about."""

    cls: type
    fields: dict[str, Any]
    defaults: tuple[tuple[str, Any], ...] = ()
    fixtures = ()

    def __call__(self, tmp: str) -> None:
        self.cls(**dict(self.defaults), **self.fields)

    def __repr__(self) -> str:
        args = {**dict(self.defaults), **self.fields}
        return f"{self.cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def lsgd(**fields):
    return Config(LSGDConfig, fields)


def easgd(**fields):
    return Config(EASGDConfig, fields)


def downpour(**fields):
    return Config(DownpourConfig, fields)


def local_sgd(**fields):
    return Config(LocalSGDConfig, fields)


def gossip(**fields):
    return Config(GossipConfig, fields)


def diloco(**fields):
    return Config(DiLoCoConfig, fields)


def data_parallel(**fields):
    return Config(DataParallelConfig, fields)


def optimizer(**fields):
    return Config(OptimizerConfig, fields)


def train(**fields):
    """TrainConfig with a budget (``epochs=1``) unless the row is about the budget."""
    budget = {"epochs", "max_steps", "time_budget_s"} & set(fields)
    return Config(TrainConfig, fields, () if budget else (("epochs", 1),))


@dataclass(frozen=True)
class Call:
    """A library function called with these arguments (``{tmp}`` filled in)."""

    function: Any
    args: tuple
    fixtures = ()

    def __call__(self, tmp: str) -> None:
        self.function(*(a.replace("{tmp}", tmp) if isinstance(a, str) else a for a in self.args))

    def __repr__(self) -> str:
        return f"{self.function.__name__}{self.args!r}"


@dataclass(frozen=True)
class Cli:
    """``python -m lsgd_ray ARGS``."""

    args: tuple[str, ...]
    fixtures: tuple[str, ...] = ()  # "small_ray": it reaches the cluster, this module's local Ray

    def __call__(self, tmp: str) -> None:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                code = main([a.replace("{tmp}", tmp) for a in self.args])
            except SystemExit as exc:  # argparse
                code = exc.code
        raise CliExit(code, stderr.getvalue())

    def __repr__(self) -> str:
        return "python -m lsgd_ray " + " ".join(self.args)


def cli(*args, fixtures=()):
    return Cli(args, fixtures)


MODEL = functools.partial(mlp, (16,), 4, hidden=8)
DATA = functools.partial(synthetic, n_train=64, n_test=32)


@dataclass(frozen=True)
class Fit:
    """``fit`` of a tiny MLP for one step, on this module's local Ray: 2 CPUs, no GPU."""

    fields: dict[str, Any]
    fixtures: tuple[str, ...] = ("small_ray",)
    within_s: float = WITHIN_S

    def __call__(self, tmp: str) -> None:
        fit(MODEL, DATA, TrainConfig(max_steps=1, quiet=True, output_dir=f"{tmp}/run", **self.fields))

    def __repr__(self) -> str:
        busy = " while a placement group holds both CPUs" if "cpus_in_use" in self.fixtures else ""
        return f"fit(mlp, synthetic, TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.fields.items())})){busy}"


def on_small_ray(**fields):
    return Fit(fields)


def on_busy_small_ray(**fields):
    """Busy resources may be freeing up (a run that just ended): the trainer waits a few seconds."""
    return Fit(fields, ("small_ray", "cpus_in_use"), AVAILABILITY_GRACE_S + WITHIN_S)


class Row(NamedTuple):
    what: str
    input: Any
    error: type[BaseException]
    message: str  # a regex


# The regexes: the field (or flag), then the bad value, then what is allowed, in the message's order.
FRACTION = r"must be in \[0, 1\]"
POSITIVE_INT = r"must be a positive integer"
ALGORITHMS = r"choose one of: aldsgd, data_parallel, diloco, downpour, dpsgd, easgd, local_sgd, lsgd"

TABLE = [
    # ------------------------------------------------------------------ LSGDConfig
    Row("lam above 1", lsgd(lam=1.5), ConfigError, rf"^lam \(local pulling strength λ\) {FRACTION}.*got 1\.5$"),
    Row("lam NaN", lsgd(lam=NAN), ConfigError, rf"^lam .*{FRACTION}.*got nan$"),
    Row("lam as a string", lsgd(lam="0.1"), ConfigError, rf"^lam .*{FRACTION}.*got '0\.1' \(str\)$"),
    Row("lam as a bool", lsgd(lam=True), ConfigError, rf"^lam .*{FRACTION}.*got True \(bool\)$"),
    Row("lam_global negative", lsgd(lam_global=-0.1), ConfigError, rf"^lam_global .*{FRACTION}.*got -0\.1$"),
    Row(
        "tau zero", lsgd(tau=0), ConfigError, rf"^tau \(local communication period τ, in steps\) {POSITIVE_INT}, got 0$"
    ),
    Row("tau a float", lsgd(tau=2.5), ConfigError, rf"^tau .*{POSITIVE_INT}, got 2\.5$"),
    Row("tau a bool", lsgd(tau=True), ConfigError, rf"^tau .*{POSITIVE_INT}, got True \(bool\)$"),
    Row("tau_global negative", lsgd(tau_global=-4), ConfigError, rf"^tau_global .*{POSITIVE_INT}, got -4$"),
    Row("unknown mode", lsgd(mode="bulk"), ConfigError, r"^unknown mode 'bulk'; choose one of: sync, async$"),
    Row(
        "unknown leader_estimate",
        lsgd(leader_estimate="ema"),
        ConfigError,
        r"^unknown leader_estimate 'ema'; choose one of: train_loss, val_batch$",
    ),
    Row("loss_window zero", lsgd(loss_window=0), ConfigError, rf"^loss_window .*{POSITIVE_INT}, got 0$"),
    Row(
        "val_batch_size a string",
        lsgd(val_batch_size="256"),
        ConfigError,
        rf"^val_batch_size {POSITIVE_INT}, got '256'",
    ),
    Row("proximal above 1", lsgd(proximal=2.0), ConfigError, rf"^proximal .*{FRACTION}.*got 2\.0$"),
    Row("proximal infinite", lsgd(proximal=INF), ConfigError, rf"^proximal .*{FRACTION}.*got inf$"),
    Row(
        "unknown evaluate",
        lsgd(evaluate="mean"),
        ConfigError,
        r"^evaluate \(the model behind test_accuracy.*\) must be one of: leader, center, got 'mean' \(str\)$",
    ),
    Row("evaluate not a string", lsgd(evaluate=None), ConfigError, r"^evaluate .* one of: leader, center, got None"),
    # ------------------------------------------------------------------ EASGDConfig
    Row(
        "beta above 1",
        easgd(beta=1.5),
        ConfigError,
        r"^beta \(EASGD's total elastic rate, α = β/p\) must be in \[0, 1\], got 1\.5$",
    ),
    Row("beta NaN", easgd(beta=NAN), ConfigError, r"^beta .*must be in \[0, 1\], got nan$"),
    Row("alpha negative", easgd(alpha=-0.1), ConfigError, rf"^alpha \(EASGD moving rate\) {FRACTION}.*got -0\.1$"),
    Row("alpha a bool", easgd(alpha=True), ConfigError, rf"^alpha .*{FRACTION}.*got True \(bool\)$"),
    Row(
        "EASGD tau zero",
        easgd(tau=0),
        ConfigError,
        rf"^tau \(EASGD communication period, in steps\) {POSITIVE_INT}, got 0$",
    ),
    Row("EASGD unknown mode", easgd(mode="bulk"), ConfigError, r"^unknown mode 'bulk'; choose one of: sync, async$"),
    # ------------------------------------------------------------------ DownpourConfig
    Row(
        "n_push zero",
        downpour(n_push=0),
        ConfigError,
        rf"^n_push \(DOWNPOUR push period, in steps\) {POSITIVE_INT}, got 0$",
    ),
    Row("n_fetch a float", downpour(n_fetch=4.0), ConfigError, rf"^n_fetch .*{POSITIVE_INT}, got 4\.0$"),
    Row(
        "DOWNPOUR unknown rule",
        downpour(rule="avg"),
        ConfigError,
        r"^unknown DOWNPOUR rule 'avg'; choose one of: mean, sum$",
    ),
    # ------------------------------------------------------------------ LocalSGDConfig
    Row(
        "local tau negative",
        local_sgd(tau=-1),
        ConfigError,
        rf"^tau \(local averaging period, in steps\) {POSITIVE_INT}, got -1$",
    ),
    Row(
        "local tau_global a string",
        local_sgd(tau_global="16"),
        ConfigError,
        rf"^tau_global .*{POSITIVE_INT}, got '16' \(str\)$",
    ),
    # ------------------------------------------------------------------ DiLoCoConfig
    Row(
        "diloco tau_global zero",
        diloco(tau_global=0),
        ConfigError,
        rf"^tau_global \(DiLoCo's outer period H, in inner steps\) {POSITIVE_INT}, got 0$",
    ),
    Row(
        "diloco tau a float",
        diloco(tau=2.5),
        ConfigError,
        rf"^tau \(hierarchical DiLoCo's group averaging period; None = flat\) {POSITIVE_INT}, got 2\.5$",
    ),
    Row(
        "diloco fragments not dividing H",
        diloco(fragments=3),
        ConfigError,
        r"^fragments must divide tau_global \(one fragment is synchronised every H/F steps\), got H = 16, F = 3$",
    ),
    Row(
        "diloco outer a string",
        diloco(outer="sgd"),
        ConfigError,
        r"^outer must be an OptimizerConfig\(\.\.\.\) \(the outer optimizer\), got 'sgd' \(str\)$",
    ),
    Row(
        "--fragments zero",
        cli("--algorithm", "diloco", "--fragments", "0"),
        CliExit,
        rf"^error: fragments \(Streaming DiLoCo's fragments; 1 = plain DiLoCo\) {POSITIVE_INT}, got 0 \(set by --fragments\)$",
    ),
    # ------------------------------------------------------------------ DataParallelConfig
    Row(
        "compression unknown",
        data_parallel(compression="topk"),
        ConfigError,
        r"^unknown compression 'topk'; choose one of: none, powersgd, bf16$",
    ),
    Row(
        "powersgd_rank zero",
        data_parallel(powersgd_rank=0),
        ConfigError,
        rf"^powersgd_rank \(PowerSGD's matrix approximation rank\) {POSITIVE_INT}, got 0$",
    ),
    Row(
        "powersgd_start negative",
        data_parallel(powersgd_start=-1),
        ConfigError,
        r"^powersgd_start \(steps of plain all-reduce before PowerSGD\) must be an integer >= 0, got -1$",
    ),
    Row(
        "powersgd_start 1 with error feedback",
        data_parallel(powersgd_start=1),
        ConfigError,
        r"^powersgd_start must be > 1 with error_feedback or warm_start .*got 1$",
    ),
    Row(
        "error_feedback a string",
        data_parallel(error_feedback="yes"),
        ConfigError,
        r"^error_feedback must be True or False, got 'yes' \(str\)$",
    ),
    Row(
        "warm_start a number",
        data_parallel(warm_start=1),
        ConfigError,
        r"^warm_start must be True or False, got 1$",
    ),
    Row(
        "--powersgd-rank zero",
        cli("--algorithm", "data_parallel", "--compression", "powersgd", "--powersgd-rank", "0"),
        CliExit,
        rf"^error: powersgd_rank .*{POSITIVE_INT}, got 0 \(set by --powersgd-rank\)$",
    ),
    Row(
        "data_parallel settings as a string",
        train(data_parallel="powersgd"),
        ConfigError,
        r"^data_parallel must be a DataParallelConfig\(...\), got 'powersgd' \(str\)$",
    ),
    # ------------------------------------------------------------------ GossipConfig
    Row(
        "unknown graph",
        gossip(graph="star"),
        ConfigError,
        r"^unknown graph 'star'; choose one of: ring, torus, random_regular, complete$",
    ),
    Row(
        "unknown rotation",
        gossip(rotation="spin"),
        ConfigError,
        r"^unknown rotation 'spin'; choose one of: matchings, none$",
    ),
    Row(
        "degree zero", gossip(degree=0), ConfigError, rf"^degree \(of the random regular graph\) {POSITIVE_INT}, got 0$"
    ),
    Row("gossip tau zero", gossip(tau=0), ConfigError, rf"^tau \(gossip period, in steps\) {POSITIVE_INT}, got 0$"),
    Row("c1 above 1", gossip(c1=1.5), ConfigError, rf"^c1 \(AL-DSGD corrective coefficient\) {FRACTION}.*got 1\.5$"),
    Row("c2 NaN", gossip(c2=NAN), ConfigError, rf"^c2 .*{FRACTION}.*got nan$"),
    Row("p1 negative", gossip(p1=-0.2), ConfigError, rf"^p1 .*{FRACTION}.*got -0\.2$"),
    Row("p2 a string", gossip(p2="0.2"), ConfigError, rf"^p2 .*{FRACTION}.*got '0\.2' \(str\)$"),
    Row("c1 + c2 above 1", gossip(c1=0.7, c2=0.5), ConfigError, r"^c1 \+ c2 must be <= 1 .*got 0\.7 \+ 0\.5 = 1\.2$"),
    Row("p1 + p2 above 1", gossip(p1=0.6, p2=0.6), ConfigError, r"^p1 \+ p2 must be <= 1 .*got 0\.6 \+ 0\.6 = 1\.2$"),
    Row(
        "graph_seed a string",
        gossip(graph_seed="0"),
        ConfigError,
        r"^graph_seed .*must be an integer, got '0' \(str\)$",
    ),
    # ------------------------------------------------------------------ OptimizerConfig
    Row(
        "unknown optimizer",
        optimizer(name="lbfgs"),
        ConfigError,
        r"^unknown optimizer 'lbfgs'; choose one of: sgd, adam, adamw, rmsprop$",
    ),
    Row("lr zero", optimizer(lr=0), ConfigError, r"^lr must be a positive number \(finite, > 0\), got 0$"),
    Row("lr infinite", optimizer(lr=INF), ConfigError, r"^lr must be a positive number .*got inf$"),
    Row("lr a string", optimizer(lr="0.1"), ConfigError, r"^lr must be a positive number .*got '0\.1' \(str\)$"),
    Row("lr a bool", optimizer(lr=True), ConfigError, r"^lr must be a positive number .*got True \(bool\)$"),
    Row("momentum 1", optimizer(momentum=1.0), ConfigError, r"^momentum must be in \[0, 1\), got 1\.0$"),
    Row("momentum NaN", optimizer(momentum=NAN), ConfigError, r"^momentum must be in \[0, 1\), got nan$"),
    Row(
        "momentum a string",
        optimizer(momentum="0.9"),
        ConfigError,
        r"^momentum must be in \[0, 1\), got '0\.9' \(str\)$",
    ),
    Row(
        "nesterov without momentum",
        optimizer(momentum=0.0),
        ConfigError,
        r"^nesterov=True needs momentum > 0 .*; set nesterov=False or give a momentum$",
    ),
    Row(
        "nesterov a string",
        optimizer(nesterov="yes"),
        ConfigError,
        r"^nesterov must be True or False, got 'yes' \(str\)$",
    ),
    Row(
        "weight_decay negative",
        optimizer(weight_decay=-1e-4),
        ConfigError,
        r"^weight_decay must be >= 0 .*got -0\.0001$",
    ),
    Row(
        "weight_decay NaN",
        optimizer(weight_decay=NAN),
        ConfigError,
        r"^weight_decay must be >= 0 \(a finite number\), got nan$",
    ),
    Row(
        "weight_decay a string",
        optimizer(weight_decay="0"),
        ConfigError,
        r"^weight_decay must be >= 0 .*got '0' \(str\)$",
    ),
    # ------------------------------------------------------------------ TrainConfig
    Row(
        "unknown algorithm",
        train(algorithm="sgd-magic"),
        ConfigError,
        rf"^unknown algorithm 'sgd-magic'; {ALGORITHMS}$",
    ),
    Row("algorithm None", train(algorithm=None), ConfigError, rf"^unknown algorithm None; {ALGORITHMS}$"),
    Row(
        "lsgd another config",
        train(lsgd=EASGDConfig()),
        ConfigError,
        r"^lsgd must be a LSGDConfig\(...\), got EASGDConfig\(",
    ),
    Row(
        "easgd a dict",
        train(easgd={"beta": 0.5}),
        ConfigError,
        r"^easgd must be a EASGDConfig\(...\), got \{'beta': 0\.5\} \(dict\)$",
    ),
    Row("downpour None", train(downpour=None), ConfigError, r"^downpour must be a DownpourConfig\(...\), got None"),
    Row(
        "local_sgd another config",
        train(local_sgd=LSGDConfig()),
        ConfigError,
        r"^local_sgd must be a LocalSGDConfig\(...\), got LSGDConfig",
    ),
    Row(
        "gossip a string",
        train(gossip="ring"),
        ConfigError,
        r"^gossip must be a GossipConfig\(...\), got 'ring' \(str\)$",
    ),
    Row(
        "diloco settings as a dict",
        train(diloco={"tau_global": 8}),
        ConfigError,
        r"^diloco must be a DiLoCoConfig\(...\), got \{'tau_global': 8\} \(dict\)$",
    ),
    Row(
        "optimizer a name",
        train(optimizer="sgd"),
        ConfigError,
        r"^optimizer must be an OptimizerConfig\(...\), got 'sgd' \(str\)$",
    ),
    Row("num_groups zero", train(num_groups=0), ConfigError, rf"^num_groups {POSITIVE_INT}, got 0$"),
    Row("num_groups a bool", train(num_groups=True), ConfigError, rf"^num_groups {POSITIVE_INT}, got True \(bool\)$"),
    Row(
        "workers_per_group a float",
        train(workers_per_group=2.0),
        ConfigError,
        rf"^workers_per_group {POSITIVE_INT}, got 2\.0$",
    ),
    Row(
        "cpus_per_worker zero",
        train(cpus_per_worker=0),
        ConfigError,
        r"^cpus_per_worker must be > 0 \(a finite number of Ray CPUs per worker\), got 0$",
    ),
    Row(
        "cpus_per_worker infinite", train(cpus_per_worker=INF), ConfigError, r"^cpus_per_worker must be > 0 .*got inf$"
    ),
    Row(
        "cpus_per_worker a string",
        train(cpus_per_worker="1"),
        ConfigError,
        r"^cpus_per_worker must be > 0 .*got '1' \(str\)$",
    ),
    Row(
        "gpus_per_worker negative",
        train(gpus_per_worker=-1),
        ConfigError,
        r"^gpus_per_worker must be >= 0 .*0\.5 shares one\), got -1$",
    ),
    Row("gpus_per_worker NaN", train(gpus_per_worker=NAN), ConfigError, r"^gpus_per_worker must be >= 0 .*got nan$"),
    Row("batch_size zero", train(batch_size=0), ConfigError, rf"^batch_size {POSITIVE_INT}, got 0$"),
    Row("batch_size a bool", train(batch_size=True), ConfigError, rf"^batch_size {POSITIVE_INT}, got True \(bool\)$"),
    Row("no budget", Config(TrainConfig, {}), ConfigError, r"^set a budget: epochs, max_steps or time_budget_s"),
    Row(
        "epochs negative",
        train(epochs=-1),
        ConfigError,
        r"^epochs must be > 0 \(a finite number of passes over each shard; None for no limit\), got -1$",
    ),
    Row("epochs infinite", train(epochs=INF), ConfigError, r"^epochs must be > 0 .*got inf$"),
    Row("epochs a string", train(epochs="3"), ConfigError, r"^epochs must be > 0 .*got '3' \(str\)$"),
    Row("epochs a bool", train(epochs=True), ConfigError, r"^epochs must be > 0 .*got True \(bool\)$"),
    Row("max_steps zero", train(max_steps=0), ConfigError, rf"^max_steps {POSITIVE_INT}, got 0$"),
    Row("max_steps a float", train(max_steps=2.5), ConfigError, rf"^max_steps {POSITIVE_INT}, got 2\.5$"),
    Row(
        "time_budget_s zero",
        train(time_budget_s=0),
        ConfigError,
        r"^time_budget_s must be > 0 \(a finite number of seconds; None for no limit\), got 0$",
    ),
    Row("time_budget_s NaN", train(time_budget_s=NAN), ConfigError, r"^time_budget_s must be > 0 .*got nan$"),
    Row(
        "time_budget_s a string",
        train(time_budget_s="60"),
        ConfigError,
        r"^time_budget_s must be > 0 .*got '60' \(str\)$",
    ),
    Row(
        "eval_every_s zero",
        train(eval_every_s=0),
        ConfigError,
        r"^eval_every_s must be > 0 \(a finite number of seconds\), got 0$",
    ),
    Row("eval_every_s infinite", train(eval_every_s=INF), ConfigError, r"^eval_every_s must be > 0 .*got inf$"),
    Row(
        "target_accuracy zero",
        train(target_accuracy=0),
        ConfigError,
        r"^target_accuracy must be a test accuracy in \(0, 1\] \(e\.g\. 0\.88\), or None to train to the budget, got 0$",
    ),
    Row("target_accuracy a percentage", train(target_accuracy=88), ConfigError, r"^target_accuracy must .*got 88$"),
    Row("target_accuracy NaN", train(target_accuracy=NAN), ConfigError, r"^target_accuracy must .*got nan$"),
    Row("target_accuracy a string", train(target_accuracy="0.9"), ConfigError, r"^target_accuracy must .*\(str\)$"),
    Row("eval_batch_size zero", train(eval_batch_size=0), ConfigError, rf"^eval_batch_size {POSITIVE_INT}, got 0$"),
    Row("seed a float", train(seed=1.5), ConfigError, r"^seed must be an integer in \[0, 2\*\*32\), got 1\.5$"),
    Row(
        "seed a bool", train(seed=True), ConfigError, r"^seed must be an integer in \[0, 2\*\*32\), got True \(bool\)$"
    ),
    Row("seed negative", train(seed=-1), ConfigError, r"^seed must be an integer in \[0, 2\*\*32\), got -1$"),
    Row(
        "seed too large for torch",
        train(seed=2**64),
        ConfigError,
        r"^seed must be an integer in \[0, 2\*\*32\), got 18446744073709551616$",
    ),
    Row(
        "output_dir empty",
        train(output_dir=""),
        ConfigError,
        r"^output_dir must be a non-empty path \(a str\) or None, got '' \(str\)$",
    ),
    Row(
        "output_dir a number",
        train(output_dir=3),
        ConfigError,
        r"^output_dir must be a non-empty path \(a str\) or None, got 3$",
    ),
    Row(
        "address a number",
        train(address=6379),
        ConfigError,
        r"^address must be a Ray cluster address such as 'auto' .*or None for an embedded Ray, got 6379$",
    ),
    Row("address empty", train(address=""), ConfigError, r"^address must be a Ray cluster address .*got '' \(str\)$"),
    Row(
        "actor_timeout_s negative",
        train(actor_timeout_s=-5),
        ConfigError,
        r"^actor_timeout_s must be > 0 \(a finite number of seconds\), got -5$",
    ),
    Row(
        "actor_timeout_s infinite", train(actor_timeout_s=INF), ConfigError, r"^actor_timeout_s must be > 0 .*got inf$"
    ),
    Row(
        "straggler delay negative",
        train(straggler_delay_s={0: -1.0}),
        ConfigError,
        r"^straggler_delay_s maps worker rank -> seconds >= 0, got 0: -1\.0$",
    ),
    Row(
        "straggler rank negative",
        train(straggler_delay_s={-1: 0.1}),
        ConfigError,
        r"^straggler_delay_s maps worker rank -> seconds >= 0, got -1: 0\.1$",
    ),
    Row(
        "straggler rank a string",
        train(straggler_delay_s={"0": 0.1}),
        ConfigError,
        r"^straggler_delay_s .*got '0' \(str\): 0\.1$",
    ),
    Row("straggler delay NaN", train(straggler_delay_s={0: NAN}), ConfigError, r"^straggler_delay_s .*got 0: nan$"),
    Row(
        "straggler delay a string",
        train(straggler_delay_s={0: "x"}),
        ConfigError,
        r"^straggler_delay_s .*got 0: 'x' \(str\)$",
    ),
    Row(
        "straggler_delay_s a list",
        train(straggler_delay_s=[0.1]),
        ConfigError,
        r"^straggler_delay_s maps worker rank -> seconds >= 0, e\.g\. \{0: 0\.05\}, got \[0\.1\] \(list\)$",
    ),
    Row("quiet a string", train(quiet="no"), ConfigError, r"^quiet must be True or False, got 'no' \(str\)$"),
    Row(
        "comm_dtype unknown",
        train(comm_dtype="float16"),
        ConfigError,
        r"^unknown comm_dtype 'float16'; choose one of: float32, bfloat16$",
    ),
    Row(
        "comm_dtype bfloat16 for an algorithm without it",
        train(algorithm="downpour", comm_dtype="bfloat16"),
        ConfigError,
        r"^comm_dtype 'bfloat16' is not implemented for downpour \(it takes: float32\)$",
    ),
    Row(
        "redeal_shards a string",
        train(redeal_shards="yes"),
        ConfigError,
        r"^redeal_shards must be True or False, got 'yes' \(str\)$",
    ),
    Row(
        "stop_on_divergence a number",
        train(stop_on_divergence=1),
        ConfigError,
        r"^stop_on_divergence must be True or False, got 1$",
    ),
    Row(
        "checkpoint_every_steps zero",
        train(checkpoint_every_steps=0),
        ConfigError,
        rf"^checkpoint_every_steps {POSITIVE_INT}, got 0$",
    ),
    Row(
        "checkpoint_every_steps a bool",
        train(checkpoint_every_steps=True),
        ConfigError,
        rf"^checkpoint_every_steps {POSITIVE_INT}, got True \(bool\)$",
    ),
    Row(
        "checkpoint_every_s zero",
        train(checkpoint_every_s=0),
        ConfigError,
        r"^checkpoint_every_s must be > 0 \(a finite number of seconds; None for none\), got 0$",
    ),
    Row(
        "checkpoint_every_s NaN",
        train(checkpoint_every_s=NAN),
        ConfigError,
        r"^checkpoint_every_s must be > 0 .*got nan$",
    ),
    Row(
        "checkpoint_every_s a string",
        train(checkpoint_every_s="5"),
        ConfigError,
        r"^checkpoint_every_s must be > 0 .*got '5' \(str\)$",
    ),
    Row("keep_checkpoints zero", train(keep_checkpoints=0), ConfigError, rf"^keep_checkpoints {POSITIVE_INT}, got 0$"),
    Row(
        "keep_checkpoints a float",
        train(keep_checkpoints=2.0),
        ConfigError,
        rf"^keep_checkpoints {POSITIVE_INT}, got 2\.0$",
    ),
    Row(
        "resume empty",
        train(resume=""),
        ConfigError,
        r"^resume must be a non-empty path \(a str\) or None, got '' \(str\)$",
    ),
    Row("resume a number", train(resume=1), ConfigError, r"^resume must be a non-empty path \(a str\) or None, got 1$"),
    # ------------------------------------------------------------------ names outside the configs
    Row(
        "unknown dataset",
        Call(dataset_factory, ("imagenet2",)),
        ConfigError,
        r"^unknown dataset 'imagenet2'; choose one of: cifar10, digits, fashion-mnist, .*mnist, synthetic$",
    ),
    Row(
        "unknown model",
        Call(model_factory, ("resnet9", (1, 8, 8), 10)),
        ConfigError,
        r"^unknown model 'resnet9'; choose one of: cnn, cnn7, mlp, resnet20, resnet50, vgg16$",
    ),
    Row(
        "unknown augment",
        Call(dataset_factory, ("cifar10", "{tmp}", False, "rotate")),
        ConfigError,
        r"^unknown augment 'rotate'; choose one of: none, crop28-flip, pad4-crop-flip, flip$",
    ),
    Row(
        "augment on vectors",
        Call(dataset_factory, ("synthetic", None, False, "flip")),
        ConfigError,
        r"^augment 'flip' needs image data; dataset 'synthetic' is not$",
    ),
    Row(
        "image model on vectors",
        Call(model_factory, ("cnn", (16,), 4)),
        ConfigError,
        r"^model 'cnn' needs image inputs \(C, H, W\), the dataset gives \(16,\); use 'mlp'$",
    ),
    # ------------------------------------------------------------------ data directories
    Row(
        "data directory not given",
        Call(dataset_factory, ("mnist",)),
        ConfigError,
        r"^dataset 'mnist' needs a data directory \(--data-dir\)$",
    ),
    Row(
        "MNIST missing",
        Call(dataset_factory, ("mnist", "{tmp}")),
        DatasetNotFoundError,
        r"^MNIST not found: {tmp}/MNIST/raw lacks train-images-idx3-ubyte, .*Copy the four idx files .* into "
        r"{tmp}/MNIST/raw, or on a machine with internet run `python -m lsgd_ray download mnist --data-dir {tmp}`\.$",
    ),
    Row(
        "Fashion-MNIST missing",
        Call(dataset_factory, ("fashion-mnist", "{tmp}")),
        DatasetNotFoundError,
        r"^FashionMNIST not found: {tmp}/FashionMNIST/raw lacks .*`python -m lsgd_ray download fashion-mnist --data-dir {tmp}`\.$",
    ),
    Row(
        "CIFAR-10 missing",
        Call(dataset_factory, ("cifar10", "{tmp}")),
        DatasetNotFoundError,
        r"^CIFAR-10 not found: {tmp}/cifar-10-batches-py lacks data_batch_1, .*test_batch\. .*Extract "
        r"cifar-10-python\.tar\.gz .* into {tmp}, or .*`python -m lsgd_ray download cifar10 --data-dir {tmp}`\.$",
    ),
    Row(
        "data directory that does not exist",
        Call(dataset_factory, ("mnist", "{tmp}/nowhere")),
        DatasetNotFoundError,
        r"^MNIST not found: {tmp}/nowhere/MNIST/raw lacks .*--data-dir {tmp}/nowhere`\.$",
    ),
    # ------------------------------------------------------------------ command line
    Row(
        "flag not a number",
        cli("--lam", "abc"),
        CliExit,
        r"^lsgd-ray train: error: argument --lam: invalid float value: 'abc'",
    ),
    Row(
        "integer flag a float",
        cli("--tau", "2.5"),
        CliExit,
        r"^lsgd-ray train: error: argument --tau: invalid int value: '2\.5'",
    ),
    Row(
        "flag without its value",
        cli("--lam"),
        CliExit,
        r"^lsgd-ray train: error: argument --lam: expected one argument",
    ),
    Row(
        "misspelt flag",
        cli("--lamda", "0.1"),
        CliExit,
        r"^lsgd-ray: error: unrecognized arguments: --lamda 0\.1 \(did you mean --lam\?\)",
    ),
    Row(
        "unknown --algorithm",
        cli("--algorithm", "sgd-magic"),
        CliExit,
        r"argument --algorithm: invalid choice: 'sgd-magic' \(choose from .*'lsgd'\)",
    ),
    Row(
        "unknown --dataset",
        cli("--dataset", "imagenet9"),
        CliExit,
        r"argument --dataset: invalid choice: 'imagenet9' \(choose from .*'digits'.*\)",
    ),
    Row(
        "unknown --model",
        cli("--model", "resnet9"),
        CliExit,
        r"argument --model: invalid choice: 'resnet9' \(choose from .*'resnet20'.*\)",
    ),
    Row(
        "unknown --optimizer",
        cli("--optimizer", "lbfgs"),
        CliExit,
        r"argument --optimizer: invalid choice: 'lbfgs' \(choose from .*'sgd'.*\)",
    ),
    Row(
        "unknown --mode",
        cli("--mode", "bulk"),
        CliExit,
        r"argument --mode: invalid choice: 'bulk' \(choose from 'sync', 'async'\)",
    ),
    Row(
        "unknown --graph",
        cli("--graph", "star"),
        CliExit,
        r"argument --graph: invalid choice: 'star' \(choose from 'ring', 'torus', ",
    ),
    Row(
        "unknown --rotation",
        cli("--rotation", "spin"),
        CliExit,
        r"argument --rotation: invalid choice: 'spin' \(choose from 'matchings', 'none'\)",
    ),
    Row(
        "unknown --augment",
        cli("--augment", "rotate"),
        CliExit,
        r"argument --augment: invalid choice: 'rotate' \(choose from 'none', ",
    ),
    Row(
        "unknown --leader-estimate",
        cli("--leader-estimate", "ema"),
        CliExit,
        r"argument --leader-estimate: invalid choice: 'ema' \(choose from 'train_loss', 'val_batch'\)",
    ),
    Row(
        "unknown --evaluate",
        cli("--evaluate", "mean"),
        CliExit,
        r"argument --evaluate: invalid choice: 'mean' \(choose from 'leader', 'center'\)",
    ),
    Row(
        "unknown command",
        cli("fit"),
        CliExit,
        r"^lsgd-ray: error: argument command: invalid choice: 'fit' \(choose from 'train', 'download', 'cluster'\)",
    ),
    Row(
        "--lam above 1",
        cli("--lam", "1.5"),
        CliExit,
        rf"^error: lam \(local pulling strength λ\) {FRACTION}.*got 1\.5 \(set by --lam\)$",
    ),
    Row("--lam NaN", cli("--lam", "nan"), CliExit, rf"^error: lam .*{FRACTION}.*got nan \(set by --lam\)$"),
    Row("--tau zero", cli("--tau", "0"), CliExit, rf"^error: tau .*{POSITIVE_INT}, got 0 \(set by --tau\)$"),
    Row(
        "--epochs infinite",
        cli("--epochs", "inf"),
        CliExit,
        r"^error: epochs must be > 0 .*got inf \(set by --epochs\)$",
    ),
    Row(
        "--time-budget negative",
        cli("--time-budget", "-5"),
        CliExit,
        r"^error: time_budget_s must be > 0 .*got -5\.0 \(set by --time-budget\)$",
    ),
    Row(
        "--eval-every zero",
        cli("--eval-every", "0"),
        CliExit,
        r"^error: eval_every_s must be > 0 .*got 0\.0 \(set by --eval-every\)$",
    ),
    Row(
        "--target-accuracy as a percentage",
        cli("--target-accuracy", "88"),
        CliExit,
        r"^error: target_accuracy must be a test accuracy in \(0, 1\] .*got 88\.0 \(set by --target-accuracy\)$",
    ),
    Row(
        "--batch-size zero",
        cli("--batch-size", "0"),
        CliExit,
        r"^error: --batch-size must be a positive integer \(per worker; .*\), got 0$",
    ),
    Row(
        "--groups negative",
        cli("--groups", "-1"),
        CliExit,
        r"^error: --groups must be >= 0 \(0 = one group per Ray node\), got -1$",
    ),
    Row(
        "--workers-per-group negative",
        cli("--workers-per-group", "-2"),
        CliExit,
        r"^error: --workers-per-group must be >= 0 \(0 = as many as fit on the node\), got -2$",
    ),
    Row(
        "--cpus-per-worker zero",
        cli("--cpus-per-worker", "0"),
        CliExit,
        r"^error: cpus_per_worker must be > 0 .*got 0\.0 \(set by --cpus-per-worker\)$",
    ),
    Row(
        "--momentum 1",
        cli("--momentum", "1"),
        CliExit,
        r"^error: momentum must be in \[0, 1\), got 1\.0 \(set by --momentum\)$",
    ),
    Row(
        "--preset unknown",
        cli("--preset", "paper"),
        CliExit,
        r"argument --preset: invalid choice: 'paper' \(choose from .*'reference-lsgd'.*\)",
    ),
    Row(
        "--preset of another algorithm",
        cli("--preset", "reference-easgd", "--algorithm", "lsgd"),
        CliExit,
        r"^error: --preset reference-easgd is a configuration of easgd, not of --algorithm lsgd$",
    ),
    Row("--c1 + --c2 above 1", cli("--c1", "0.7", "--c2", "0.5"), CliExit, r"^error: c1 \+ c2 must be <= 1 .*= 1\.2$"),
    Row(
        "--seed negative",
        cli("--seed", "-3"),
        CliExit,
        r"^error: seed must be an integer in \[0, 2\*\*32\), got -3 \(set by --seed\)$",
    ),
    Row(
        "--checkpoint-every zero",
        cli("--checkpoint-every", "0"),
        CliExit,
        rf"^error: checkpoint_every_steps {POSITIVE_INT}, got 0 \(set by --checkpoint-every\)$",
    ),
    Row(
        "--keep-checkpoints zero",
        cli("--keep-checkpoints", "0"),
        CliExit,
        rf"^error: keep_checkpoints {POSITIVE_INT}, got 0 \(set by --keep-checkpoints\)$",
    ),
    Row(
        "--dataset mnist without --data-dir",
        cli("--dataset", "mnist"),
        CliExit,
        r"^error: dataset 'mnist' needs a data directory \(--data-dir\)$",
    ),
    Row(
        "--data-dir without the files",
        cli("--dataset", "cifar10", "--data-dir", "{tmp}"),
        CliExit,
        r"^error: CIFAR-10 not found: {tmp}/cifar-10-batches-py lacks .*--data-dir {tmp}`\.$",
    ),
    Row(
        "--augment on vectors",
        cli("--dataset", "synthetic", "--augment", "flip"),
        CliExit,
        r"^error: augment 'flip' needs image data; dataset 'synthetic' is not$",
    ),
    Row(
        "--gpus-per-worker with no GPU",
        cli("--dataset", "synthetic", "--gpus-per-worker", "1", "--max-steps", "1", fixtures=("small_ray",)),
        CliExit,
        r"^error: cannot place 2 group\(s\) x 2 worker\(s\), each worker needing CPU=1, GPU=1 .*"
        r"Missing in total: CPU=2, GPU=4 .*Lower workers_per_group / num_groups, cpus_per_worker / gpus_per_worker, "
        r"or add nodes\.$",
    ),
    # ------------------------------------------------------------------ placement (2 CPUs, no GPU)
    Row(
        "more CPUs per worker than a node has",
        on_small_ray(num_groups=1, workers_per_group=1, cpus_per_worker=4),
        PlacementError,
        r"^cannot place 1 group\(s\) x 1 worker\(s\), each worker needing CPU=4 on one node per group\. "
        r"The cluster has node \w+: CPU=2\. Missing in total: CPU=2 ",
    ),
    Row(
        "a GPU where there is none",
        on_small_ray(num_groups=1, workers_per_group=1, gpus_per_worker=1),
        PlacementError,
        r"^cannot place .*each worker needing CPU=1, GPU=1 .*node \w+: CPU=2, GPU=0\. Missing in total: CPU=0, GPU=1 ",
    ),
    Row(
        "more workers than CPUs",
        on_small_ray(num_groups=2, workers_per_group=2),
        PlacementError,
        r"^cannot place 2 group\(s\) x 2 worker\(s\), .*CPU=2\. Missing in total: CPU=2 \(or a node large enough",
    ),
    Row(
        "CPUs held by another run",
        on_busy_small_ray(num_groups=1, workers_per_group=1),
        PlacementError,
        r"^the cluster has the resources in total but they are in use \(by other actors or jobs\): node \w+ needs "
        r"CPU=1 for 1 worker\(s\) but has 0 free \(missing 1\)\. Wait for them to finish, or ask for fewer workers\.$",
    ),
]


@pytest.fixture(scope="module")
def small_ray():
    """A local Ray with 2 CPUs and no GPU, started only for the rows that need one."""
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def cpus_in_use(small_ray):
    """Both CPUs of the small Ray reserved (by a placement group) for the length of the row."""
    from ray.util import placement_group, remove_placement_group

    group = placement_group([{"CPU": 2}])
    ray.get(group.ready(), timeout=60)
    yield
    remove_placement_group(group)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("row", TABLE, ids=[row.what for row in TABLE])
def test_bad_input_is_refused_with_an_actionable_message(row, tmp_path, request):
    for fixture in row.input.fixtures:  # set up before the clock starts
        request.getfixturevalue(fixture)
    tmp = str(tmp_path)
    begin = time.perf_counter()
    with pytest.raises(row.error) as caught:
        row.input(tmp)
    elapsed = time.perf_counter() - begin
    message = caught.value.stderr.rstrip("\n") if isinstance(caught.value, CliExit) else str(caught.value)
    assert re.search(row.message.replace("{tmp}", re.escape(tmp)), message), f"{row.input!r}\n{message}"
    assert elapsed < getattr(row.input, "within_s", WITHIN_S), f"{row.input!r} took {elapsed:.1f}s to be refused"
    if isinstance(caught.value, CliExit):
        assert caught.value.code == 2, message
        assert "\n" not in message and "Traceback" not in message, message  # one line


def test_the_table_covers_every_config_field():
    """A field added to a config without a row here fails this test."""
    import dataclasses

    covered: dict[type, set[str]] = {}
    for row in TABLE:
        if isinstance(row.input, Config):
            covered.setdefault(row.input.cls, set()).update(row.input.fields)
    for cls in (
        TrainConfig, LSGDConfig, EASGDConfig, DownpourConfig, LocalSGDConfig, GossipConfig, DiLoCoConfig,
        DataParallelConfig, OptimizerConfig,
    ):  # fmt: skip
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= covered.get(cls, set()), f"{cls.__name__}: no bad-input row for {fields - covered[cls]}"
