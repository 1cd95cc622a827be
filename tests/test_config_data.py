"""Configuration checks, flat buffers, data sharding and the dataset loaders (no Ray)."""

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from lsgd_ray.config import (
    ConfigError,
    DownpourConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
)
from lsgd_ray.data import BatchStream, DatasetNotFoundError, dataset_factory, digits, shard_indices, synthetic
from lsgd_ray.flat import FlatState, flatten_state, load_flat
from lsgd_ray.models import model_factory

# --------------------------------------------------------------------------- configuration

BAD_CONFIGS = [
    (lambda: LSGDConfig(lam=1.5), "lam .* must be in \\[0, 1\\]"),
    (lambda: LSGDConfig(lam_global=-0.1), "lam_global .* must be in \\[0, 1\\]"),
    (lambda: LSGDConfig(tau=0), "tau .* positive integer"),
    (lambda: LSGDConfig(tau_global=-4), "tau_global .* positive integer"),
    (lambda: LSGDConfig(mode="bulk"), "unknown mode 'bulk'; choose one of: sync, async"),
    (lambda: LSGDConfig(leader_estimate="ema"), "choose one of: train_loss, val_batch"),
    (lambda: OptimizerConfig(name="lbfgs"), "unknown optimizer 'lbfgs'; choose one of"),
    (lambda: OptimizerConfig(lr=0), "lr must be a positive number"),
    (lambda: OptimizerConfig(momentum=0.0), "nesterov=True needs momentum > 0"),
    (
        lambda: TrainConfig(algorithm="sgd-magic", epochs=1),
        "unknown algorithm 'sgd-magic'; choose one of: aldsgd, data_parallel, diloco, downpour, dpsgd, easgd, local_sgd, lsgd",
    ),
    (lambda: LSGDConfig(proximal=2.0), "proximal .* must be in \\[0, 1\\]"),
    (lambda: EASGDConfig(beta=1.5), "beta .* must be in \\[0, 1\\]"),
    (lambda: EASGDConfig(alpha=-0.1), "alpha .* must be in \\[0, 1\\]"),
    (lambda: EASGDConfig(mode="bulk"), "unknown mode 'bulk'"),
    (lambda: DownpourConfig(n_push=0), "n_push .* positive integer"),
    (lambda: LocalSGDConfig(tau_global=0), "tau_global .* positive integer"),
    (lambda: GossipConfig(graph="star"), "unknown graph 'star'; choose one of: ring, torus, random_regular, complete"),
    (lambda: GossipConfig(rotation="spin"), "unknown rotation 'spin'; choose one of: matchings, none"),
    (lambda: GossipConfig(c1=0.7, c2=0.5), "c1 \\+ c2 must be <= 1"),
    (lambda: TrainConfig(epochs=1, easgd=LSGDConfig()), "easgd must be a EASGDConfig"),
    (lambda: TrainConfig(), "set a budget"),
    (lambda: TrainConfig(epochs=1, num_groups=0), "num_groups must be a positive integer"),
    (lambda: TrainConfig(epochs=1, batch_size=0), "batch_size must be a positive integer"),
    (lambda: TrainConfig(epochs=1, cpus_per_worker=0), "cpus_per_worker must be > 0"),
    (lambda: TrainConfig(epochs=1, straggler_delay_s={0: -1.0}), "straggler_delay_s"),
]


@pytest.mark.parametrize("make,message", BAD_CONFIGS)
def test_bad_config_is_refused_with_a_message(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_good_config_round_trips_to_dict():
    cfg = TrainConfig(epochs=2, straggler_delay_s={1: 0.5})
    data = cfg.to_dict()
    assert data["lsgd"]["tau"] == 4 and data["straggler_delay_s"] == {"1": 0.5}
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # frozen


def test_unknown_dataset_and_model_names_list_valid_ones():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet2'; choose one of: cifar10, digits"):
        dataset_factory("imagenet2")
    with pytest.raises(
        ConfigError, match="unknown model 'resnet9'; choose one of: cnn, cnn7, mlp, resnet20, resnet50, vgg16"
    ):
        model_factory("resnet9", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="needs a data directory"):
        dataset_factory("mnist")


# --------------------------------------------------------------------------- flat buffers


def test_flat_state_views_params_and_batchnorm_buffers():
    torch.manual_seed(0)
    model = model_factory("cnn", (1, 8, 8), 10)()
    reference = flatten_state(model).clone()
    state = FlatState(model)
    assert torch.equal(state.flat, reference)
    # parameters and BN running stats are views of the flat buffer
    bn = model[1]
    assert bn.running_mean.data_ptr() == state.flat[state.num_params :].data_ptr()
    state.flat.add_(1.0)
    assert torch.equal(flatten_state(model), reference + 1.0)
    # a training step writes through the views; gradients live in the flat grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    assert state.grad.abs().sum() > 0
    before = state.flat.clone()
    opt.step()
    assert not torch.equal(before[: state.num_params], state.flat[: state.num_params])
    # load_flat copies into an ordinary model
    copy = load_flat(model_factory("cnn", (1, 8, 8), 10)(), state.flat)
    assert torch.equal(flatten_state(copy), state.flat)
    assert state.nbytes == state.flat.numel() * 4


def test_flat_state_refuses_mixed_dtypes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        FlatState(model)


# --------------------------------------------------------------------------- data


def test_shards_are_disjoint_and_cover():
    shards = [shard_indices(103, 4, i, seed=1) for i in range(4)]
    joined = torch.cat(shards).sort().values
    assert torch.equal(joined, torch.arange(103))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_batch_stream_fixed_size_and_epochs_exact():
    stream = BatchStream(10, 4, seed=0)
    batches = [stream.next() for _ in range(5)]  # 20 samples = 2 epochs
    assert all(len(b) == 4 for b in batches)
    seen = torch.cat(batches)
    assert torch.equal(seen[:10].sort().values, torch.arange(10))
    assert torch.equal(seen[10:].sort().values, torch.arange(10))
    again = BatchStream(10, 4, seed=0)
    assert all(torch.equal(b, again.next()) for b in batches)  # reproducible


def test_digits_is_real_and_offline():
    data = digits()
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.y_train) + len(data.y_test) == 1797
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


def test_synthetic_is_seeded():
    a, b = synthetic(seed=3), synthetic(seed=3)
    assert torch.equal(a.x_train, b.x_train) and a.num_classes == 4


def _write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">I", {1: 0x0801, 3: 0x0803}[array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_read_through_torchvision(tmp_path, monkeypatch, name, folder, compress):
    monkeypatch.setenv("LSGD_RAY_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    data = dataset_factory(name, str(tmp_path / "data"))()
    assert data.x_train.shape == (30, 1, 28, 28) and data.y_test.shape == (10,)
    assert data.y_train.dtype == torch.int64


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_factory("fashion-mnist", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "download" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        dataset_factory("cifar10", str(tmp_path))


def test_coordinator_modules_do_not_import_torch():
    """The GlobalLeader's process stays small: configs and update rules load without torch."""
    import subprocess
    import sys

    code = (
        "import sys, lsgd_ray, lsgd_ray.config, lsgd_ray.algorithms.lsgd, lsgd_ray._internal.global_leader\n"
        "lsgd_ray.config.LSGDConfig(); lsgd_ray.config.TrainConfig(epochs=1)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
