"""The ``lsgd-ray train`` command's flags and the ``TrainConfig`` they make."""

from __future__ import annotations

import argparse

from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.algorithms.gossip import GRAPHS, ROTATIONS
from lsgd_ray.augment import AUGMENTS
from lsgd_ray.config import (
    COMM_DTYPES,
    DOWNPOUR_RULES,
    GRADIENT_COMPRESSIONS,
    LEADER_ESTIMATES,
    MODES,
    OPTIMIZERS,
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
from lsgd_ray.data import DATASETS
from lsgd_ray.models import MODELS
from lsgd_ray.presets import PRESETS, flag_defaults


def add_train_parser(sub: argparse._SubParsersAction, preset: str | None) -> None:
    """The ``train`` command and its flags; ``preset``: their defaults are that preset's."""
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
    a(
        "--tau",
        type=int,
        default=None,
        help="communication period τ in steps (lsgd/local_sgd/easgd: 4, gossip: 1; diloco: group averaging, default none)",
    )
    a("--tau-global", type=int, default=16, help="global period τ_G (lsgd, local_sgd; diloco: H, the outer period)")
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
    a("--compression", default="none", choices=GRADIENT_COMPRESSIONS, help="data_parallel: torch's gradient hook")
    a("--powersgd-rank", type=int, default=2, help="data_parallel --compression powersgd: its rank")
    a("--powersgd-start", type=int, default=10, help="data_parallel --compression powersgd: plain steps first")
    a("--fragments", type=int, default=1, help="diloco: Streaming DiLoCo's fragments (1 = plain DiLoCo)")
    a("--outer-optimizer", default="sgd", choices=OPTIMIZERS, help="diloco: the outer optimizer")
    a("--outer-lr", type=float, default=0.7, help="diloco: outer learning rate")
    a("--outer-momentum", type=float, default=0.9, help="diloco: outer momentum (Nesterov for sgd)")
    a("--optimizer", default="sgd", choices=OPTIMIZERS)
    a("--lr", type=float, default=0.05)
    a("--momentum", type=float, default=0.9)
    a("--no-nesterov", action="store_true")
    a("--weight-decay", type=float, default=1e-4)
    a("--batch-size", type=int, default=None, help="per worker; default: the dataset's (32 digits, 128 others)")
    a(
        "--comm-dtype",
        default="float32",
        choices=COMM_DTYPES,
        help="how weights travel: float32, or bfloat16 for half the bytes (lsgd, easgd, local_sgd, diloco)",
    )
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
        data_parallel=DataParallelConfig(
            compression=args.compression, powersgd_rank=args.powersgd_rank, powersgd_start=args.powersgd_start
        ),
        diloco=_diloco(args) if args.algorithm == "diloco" else DiLoCoConfig(),  # its checks tie --tau to it
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
        comm_dtype=args.comm_dtype,
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


def _diloco(args: argparse.Namespace) -> DiLoCoConfig:
    return DiLoCoConfig(
        tau_global=args.tau_global,
        tau=args.tau,
        fragments=args.fragments,
        outer=OptimizerConfig(
            name=args.outer_optimizer,
            lr=args.outer_lr,
            momentum=args.outer_momentum,
            nesterov=args.outer_optimizer == "sgd" and args.outer_momentum > 0,
            weight_decay=0.0,
        ),
    )
