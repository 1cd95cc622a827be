"""Command line: ``lsgd-ray train ...`` / ``python -m lsgd_ray ...``.

With no arguments it trains LSGD with 2 groups x 2 workers on scikit-learn's bundled digits
dataset on an embedded local Ray: the offline main job.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from lsgd_ray.cli_train import add_train_parser, config_from_args
from lsgd_ray.config import ConfigError, TrainConfig
from lsgd_ray.data import (
    DATASETS,
    DatasetFactory,
    DatasetFileError,
    DatasetNotFoundError,
    dataset_factory,
    dataset_spec,
)
from lsgd_ray.models import ModelFactory, model_factory
from lsgd_ray.topology import PlacementError

__all__ = ["build_parser", "config_from_args", "main", "parse_args", "prepare"]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line parsed; with ``--preset`` the train flags' defaults are the preset's."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):
        args = build_parser(args.preset).parse_args(argv)
    return args


class _Parser(argparse.ArgumentParser):
    """A bad argument ends in one line on stderr and exit code 2, not a page of usage: the
    message names the flag and the valid choices (or the closest flag); ``--help`` the rest."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = sorted(_known_flags(self))
            words = [w for w in message.split(":", 1)[1].split() if w.startswith("-")]
            close = {w: difflib.get_close_matches(w.split("=")[0], flags, n=1) for w in words}
            hints = [f"{match[0]} for {w}" if len(words) > 1 else match[0] for w, match in close.items() if match]
            if hints:
                message += f" (did you mean {', '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _known_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its sub-commands."""
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _known_flags(sub)
    return flags


# Config fields set by a flag of another name (the others: --field-name).
_FLAG_OF_FIELD = {
    "num_groups": "--groups",
    "time_budget_s": "--time-budget",
    "eval_every_s": "--eval-every",
    "checkpoint_every_steps": "--checkpoint-every",
}


def _flag_hint(message: str) -> str:
    """The flag that sets the config field an error is about, as " (set by --flag)"; else ""."""
    match = re.match(r"(\w+)(?: \([^)]*\))? must\b", message)
    if match is None:
        return ""
    field = match.group(1)
    flag = _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))
    return f" (set by {flag})" if flag in _known_flags(build_parser()) else ""


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``preset``: the train flags default to that preset's settings (``parse_args``)."""
    parser = _Parser(prog="lsgd-ray", description="Leader SGD on Ray")
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub, preset)
    d = sub.add_parser("download", help="download a torchvision dataset (needs internet)")
    d.add_argument("dataset", choices=[n for n, s in DATASETS.items() if s.needs_data_dir])
    d.add_argument("--data-dir", required=True)
    _cluster_parser(sub)
    return parser


def _cluster_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cluster", help="an emulated multi-node Ray cluster on this machine, with shaped links")
    verbs = c.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="create the nodes (network namespaces) and links, start Ray in each")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=2, help="Ray CPUs of each node (may exceed the cores)")
    up.add_argument("--link", default="none", help="each node's link rate both ways: 1gbit, 100mbit, 30mbit... or none")
    up.add_argument("--object-store-mb", type=int, default=1024, help="object store of each node")
    run = verbs.add_parser("run", help="run a command in node 0, joined to the cluster: cluster run -- COMMAND")
    run.add_argument("--node", type=int, default=0, help="run it in this node instead")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command and its arguments")
    status = verbs.add_parser("status", help="nodes, addresses, link rates, processes, bytes on each link")
    status.add_argument("--json", action="store_true", help="as one JSON object")
    verbs.add_parser("measure", help="move a 24 MB object and all-reduce 1 MiB with gloo across a link")
    link = verbs.add_parser("link", help="change the link rate of a running cluster")
    link.add_argument("rate", help="1gbit, 100mbit, 30mbit... or none")
    link.add_argument("--node", type=int, action="append", help="only this node's link (repeatable)")
    verbs.add_parser("down", help="stop every process in the cluster's namespaces, delete them")
    for verb in verbs.choices.values():
        verb.add_argument("--name", default="lsgd", help="which emulated cluster (default: lsgd)")


def _download(args: argparse.Namespace) -> int:
    try:
        dataset_factory(args.dataset, args.data_dir, download=True)()
    except Exception as exc:  # no network, bad directory...
        print(f"error: could not download {args.dataset} into {args.data_dir}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dataset} is in {args.data_dir}")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    """``lsgd-ray cluster VERB``: every failure is one line (ClusterError) and exit code 2."""
    import json
    import subprocess

    from lsgd_ray.cluster import ClusterError, EmulatedCluster

    try:
        if args.verb == "up":
            cluster = EmulatedCluster(
                args.nodes, args.cpus_per_node, args.link, args.name, args.object_store_mb, quiet=False
            ).up()
            print(f"cluster {args.name} is up: {args.nodes} node(s), links {args.link}, head at {cluster.address}")
            print(f"  run a job in node 0:  lsgd-ray cluster run --name {args.name} -- lsgd-ray train --groups 0")
            return 0
        if args.verb == "down":
            EmulatedCluster(name=args.name, quiet=False).down()
            return 0
        cluster = EmulatedCluster.attach(args.name)
        if args.verb == "run":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise ClusterError("cluster run needs a command: lsgd-ray cluster run -- COMMAND [ARGS...]")
            if not 0 <= args.node < cluster.spec.nodes:
                raise ClusterError(f"--node must be 0..{cluster.spec.nodes - 1}, got {args.node}")
            try:
                return cluster.run(command, node=args.node).returncode
            except FileNotFoundError as exc:
                raise ClusterError(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        if args.verb == "link":
            cluster.set_link(args.rate, args.node)
            print(f"cluster {args.name}: links {args.rate}" + (f" on node(s) {args.node}" if args.node else ""))
            return 0
        if args.verb == "measure":
            probe = [sys.executable, "-m", "lsgd_ray.cluster_probe"]
            done = cluster.run(probe, capture_output=True, text=True)
            if done.returncode != 0:
                raise ClusterError(f"the link probe failed: {done.stderr.strip().splitlines()[-1:]}")
            print(done.stdout.strip())
            return 0
        status = cluster.status()
        if args.json:
            print(json.dumps(status, indent=1))
            return 0
        print(f"cluster {args.name}: head at {status['address']}, {len(status['nodes'])} node(s)")
        for n in status["nodes"]:
            if not n["up"]:
                print(f"  node {n['node']}  {n['namespace']}  missing")
                continue
            print(
                f"  node {n['node']}  {n['namespace']}  {n['address']}  link {n['link']}  {n['processes']} processes  "
                f"sent {n['tx'] / 1e6:,.1f} MB  received {n['rx'] / 1e6:,.1f} MB"
            )
        return 0
    except (ClusterError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def prepare(args: argparse.Namespace) -> tuple[ModelFactory, DatasetFactory, TrainConfig]:
    """What ``train`` hands to ``fit``, from its parsed flags; a bad value raises ``ConfigError``
    (or ``DatasetNotFoundError``, ``DatasetFileError``) before any actor starts."""
    config = config_from_args(args)
    data = dataset_factory(
        args.dataset, args.data_dir, download=args.download, augment=args.augment, image_size=args.image_size
    )
    spec = dataset_spec(args.dataset, args.data_dir, args.image_size)  # imagenet: classes of the folder
    model = model_factory(args.model, spec.model_input_shape(args.augment), spec.num_classes)
    return model, data, config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    args = parse_args(argv)
    if args.command == "download":
        return _download(args)
    if args.command == "cluster":
        return _cluster(args)
    from lsgd_ray.trainer import fit

    try:
        model, data, config = prepare(args)
        result = fit(model, data, config, run_name=f"{args.algorithm}-{args.dataset}")
    except (ConfigError, PlacementError, DatasetNotFoundError, DatasetFileError) as exc:
        print(f"error: {exc}{_flag_hint(str(exc))}", file=sys.stderr)
        return 2
    return 0 if result.status == "completed" else 1
