"""The ``lsgd-ray train`` command's flags and the ``TrainConfig`` they make."""

from __future__ import annotations

import argparse

from lsgd_ray.algorithms import ALGORITHMS
from lsgd_ray.augment import AUGMENTS
from lsgd_ray.config import ConfigError, OptimizerConfig, TrainConfig
from lsgd_ray.config_checks import COMM_DTYPES, MODES, OPTIMIZERS
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
    titles: dict[str, list[str]] = {}  # algorithms sharing settings share their flags
    for row in ALGORITHMS.values():
        if row.flags:
            titles.setdefault(row.settings or row.name, []).append(row.name)
    for names in titles.values():
        ALGORITHMS[names[0]].add_flags(p.add_argument_group(f"{' and '.join(names)}'s own flags"))
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
    # every algorithm's own flags are checked whichever runs (``--c1 2`` is refused with lsgd too);
    # the shared ones (--tau...) mean something else to each, so they reach only the one run
    settings = {r.settings: r.settings_from_flags(args, shared=False) for r in ALGORITHMS.values() if r.settings}
    row = ALGORITHMS[args.algorithm]
    if row.settings:
        settings[row.settings] = row.settings_from_flags(args)
    return TrainConfig(
        algorithm=args.algorithm,
        **settings,
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
