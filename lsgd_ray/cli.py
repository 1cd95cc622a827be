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

from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.algorithms.gossip import GRAPHS, ROTATIONS
from lsgd_ray.augment import AUGMENTS
from lsgd_ray.config import (
    DOWNPOUR_RULES,
    LEADER_ESTIMATES,
    MODES,
    OPTIMIZERS,
    ConfigError,
    DownpourConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
)
from lsgd_ray.data import (
    DATASETS,
    DatasetFactory,
    DatasetFileError,
    DatasetNotFoundError,
    dataset_factory,
    dataset_spec,
)
from lsgd_ray.models import MODELS, ModelFactory, model_factory
from lsgd_ray.presets import PRESETS, flag_defaults
from lsgd_ray.topology import PlacementError


def _train_parser(sub: argparse._SubParsersAction, preset: str | None) -> None:
    p = sub.add_parser("train", help="train with LSGD or a peer (the default command)")
    a = p.add_argument
    a(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="start from a published configuration (lsgd_ray.presets; flags given explicitly win)",
    )
    a("--algorithm", default="lsgd", choices=sorted(ALGORITHMS), help="default: lsgd")
    a("--dataset", default="digits", choices=sorted(DATASETS), help="default: digits (offline, bundled)")
    a("--data-dir", default=None, help="where datasets live (mnist, fashion-mnist, cifar10; imagenet: train/ and val/)")
    a("--image-size", type=int, default=None, help="imagenet: side of the training crop and test view (default 224)")
    a("--download", action="store_true", help="let torchvision download the dataset (needs internet)")
    a("--model", default="mlp", choices=sorted(MODELS), help="cnn7/resnet20/vgg16: CIFAR-sized; resnet50: ImageNet")
    a("--augment", default=None, choices=list(AUGMENTS), help="training augmentation (cifar10: crop28-flip)")
    a("--groups", type=int, default=2, help="groups (LocalLeaders); 0 = one per Ray node")
    a("--workers-per-group", type=int, default=2, help="workers per group; 0 = as many as fit on the node")
    a("--cpus-per-worker", type=float, default=1.0)
    a("--gpus-per-worker", type=float, default=0.0)
    a("--mode", default="sync", choices=MODES, help="lsgd and easgd (downpour is always async)")
    a("--tau", type=int, default=None, help="communication period τ in steps (lsgd/local_sgd/easgd: 4, gossip: 1)")
    a("--tau-global", type=int, default=16, help="global period τ_G (lsgd, local_sgd)")
    a("--lam", type=float, default=0.1, help="local pulling strength λ in [0, 1]")
    a("--lam-global", type=float, default=0.1, help="global pulling strength λ_G in [0, 1]")
    a("--proximal", type=float, default=0.0, help="lsgd: per-step pull toward the last leaders (p/τ); 0 = off")
    a("--leader-estimate", default="train_loss", choices=LEADER_ESTIMATES)
    a("--loss-window", type=int, default=10, help="batches averaged for the train_loss estimate")
    a(
        "--evaluate",
        default="leader",
        choices=("leader", "center"),  # lsgd_ray.config.EVALUATED_MODELS
        help="lsgd: the model behind test_accuracy, the progress line and --target-accuracy "
        "(both are recorded at every evaluation; center: the mean of all workers, as the reference reports)",
    )
    a("--beta", type=float, default=0.9, help="easgd: moving rate α = β/p")
    a("--alpha", type=float, default=None, help="easgd: moving rate α (overrides --beta)")
    a("--n-push", type=int, default=4, help="downpour: push period (steps)")
    a("--n-fetch", type=int, default=4, help="downpour: fetch period (steps)")
    a(
        "--downpour-rule",
        default="mean",
        choices=DOWNPOUR_RULES,
        help="downpour: the server adds each push times 1/W (mean) or whole (sum: Dean et al.'s rule)",
    )
    a("--graph", default="ring", choices=GRAPHS, help="dpsgd/aldsgd: base communication graph")
    a("--degree", type=int, default=3, help="dpsgd/aldsgd: degree of the random_regular graph")
    a("--rotation", default="matchings", choices=ROTATIONS, help="dpsgd/aldsgd: one matching per round, or none")
    for name, default in (("c1", 0.3), ("c2", 0.1), ("p1", 0.2), ("p2", 0.2)):
        a(f"--{name}", type=float, default=default, help=f"aldsgd: corrective coefficient {name}")
    a("--optimizer", default="sgd", choices=OPTIMIZERS)
    a("--lr", type=float, default=0.05)
    a("--momentum", type=float, default=0.9)
    a("--no-nesterov", action="store_true")
    a("--weight-decay", type=float, default=1e-4)
    a("--batch-size", type=int, default=None, help="per worker; default: the dataset's (32 digits, 128 others)")
    a(
        "--redeal-shards",
        action="store_true",
        help="re-deal the workers' shares of the data every epoch (DistributedSampler.set_epoch); default: fixed shards",
    )
    a("--epochs", type=float, default=None, help="passes over each worker's shard (default 50 with no budget)")
    a("--max-steps", type=int, default=None, help="steps per worker")
    a("--time-budget", type=float, default=None, help="training seconds (evaluation excluded)")
    a("--eval-every", type=float, default=1.0, help="evaluate the leader every N training seconds")
    a("--target-accuracy", type=float, default=None, help="stop at the first evaluation at or above this accuracy")
    a("--seed", type=int, default=0)
    a("--output-dir", default=None, help="default: runs/<algorithm>-<dataset>-<time>")
    a("--address", default=None, help="Ray cluster address ('auto' for the running one); default: embedded")
    a("--quiet", action="store_true", help="only the final summary")
    a(
        "--stop-on-divergence",
        action="store_true",
        help="stop at the first evaluation whose model is non-finite or back at chance (it is reported either way)",
    )
    a("--checkpoint-every", type=int, default=None, help="checkpoint every N steps per worker")
    a("--checkpoint-every-s", type=float, default=None, help="checkpoint every N training seconds")
    a("--keep-checkpoints", type=int, default=3, help="how many checkpoints to keep")
    a("--resume", default=None, help="continue the run in this output (or checkpoint) directory")
    if preset is not None:
        p.set_defaults(**flag_defaults(preset), preset_applied=True)


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


def _check_flags(args: argparse.Namespace) -> None:
    """Flags whose 0 (or absence) means "automatic", which the configs never see."""
    for flag, value, meaning in (
        ("--groups", args.groups, "0 = one group per Ray node"),
        ("--workers-per-group", args.workers_per_group, "0 = as many as fit on the node"),
    ):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 ({meaning}), got {value}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ConfigError(
            f"--batch-size must be a positive integer (per worker; leave it out for the dataset's default), "
            f"got {args.batch_size}"
        )


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``preset``: the train flags default to that preset's settings (``parse_args``)."""
    parser = _Parser(prog="lsgd-ray", description="Leader SGD on Ray")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub, preset)
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    _check_flags(args)
    preset = getattr(args, "preset", None)
    if preset is not None:
        if not getattr(args, "preset_applied", False):
            raise ValueError("--preset needs the preset's defaults: parse with lsgd_ray.cli.parse_args")
        wanted = PRESETS[preset].settings["algorithm"]
        if args.algorithm != wanted:
            raise ConfigError(f"--preset {preset} is a configuration of {wanted}, not of --algorithm {args.algorithm}")
    spec = DATASETS[args.dataset]
    budget_given = any(v is not None for v in (args.epochs, args.max_steps, args.time_budget))
    tau = 4 if args.tau is None else args.tau
    return TrainConfig(
        algorithm=args.algorithm,
        lsgd=LSGDConfig(
            lam=args.lam,
            lam_global=args.lam_global,
            tau=tau,
            tau_global=args.tau_global,
            mode=args.mode,
            leader_estimate=args.leader_estimate,
            loss_window=args.loss_window,
            proximal=args.proximal,
            evaluate=args.evaluate,
        ),
        easgd=EASGDConfig(beta=args.beta, alpha=args.alpha, tau=tau, mode=args.mode),
        downpour=DownpourConfig(n_push=args.n_push, n_fetch=args.n_fetch, rule=args.downpour_rule),
        local_sgd=LocalSGDConfig(tau=tau, tau_global=args.tau_global),
        gossip=GossipConfig(
            graph=args.graph,
            degree=args.degree,
            rotation=args.rotation,
            tau=1 if args.tau is None else args.tau,
            c1=args.c1,
            c2=args.c2,
            p1=args.p1,
            p2=args.p2,
        ),
        optimizer=OptimizerConfig(
            name=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            nesterov=not args.no_nesterov and args.optimizer == "sgd" and args.momentum > 0,
            weight_decay=args.weight_decay,
        ),
        num_groups=args.groups or None,
        workers_per_group=args.workers_per_group or None,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size or spec.default_batch_size,
        redeal_shards=args.redeal_shards,
        epochs=args.epochs if budget_given else 50.0,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        eval_every_s=args.eval_every,
        target_accuracy=args.target_accuracy,
        seed=args.seed,
        output_dir=args.output_dir,
        address=args.address,
        quiet=args.quiet,
        stop_on_divergence=args.stop_on_divergence,
        checkpoint_every_steps=args.checkpoint_every,
        checkpoint_every_s=args.checkpoint_every_s,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
    )


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
