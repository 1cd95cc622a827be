"""ImageNet's streamed source on a tiny ImageFolder tree: 3 colour classes, real JPEG/PNG files."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

import lsgd_ray.data.streamed as data_module
from lsgd_ray import LSGDConfig, TrainConfig, fit
from lsgd_ray.cli import main
from lsgd_ray.config import ConfigError
from lsgd_ray.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    ImageFiles,
    dataset_factory,
    dataset_spec,
    random_resized_crop_box,
)
from lsgd_ray.models import model_factory

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(210, 40, 40), (40, 190, 50), (40, 60, 210)]  # class k is mostly channel k
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """``train/<class>/*.JPEG`` and ``val/<class>/*.png``: 40-ish pixel noisy colour squares."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count, ext in (("train", TRAIN_PER_CLASS, "JPEG"), ("val", VAL_PER_CLASS, "png")):
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"n0000000{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (40, 40 + 3 * i, 3)  # different widths: the crops and resizes must cope
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.{ext}")
    (root / "train" / "README.txt").write_text("not an image, not a class")
    return root


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_reads_the_tree_with_sorted_classes_labels_and_shapes(tree):
    data = dataset_factory("imagenet", str(tree), image_size=32)()
    assert data.num_classes == 3 and data.augment is None
    assert isinstance(data.x_train, ImageFiles) and isinstance(data.x_test, ImageFiles)
    assert data.x_train.shape == (24, 3, 32, 32) and data.input_shape == (3, 32, 32)
    assert data.y_train.dtype == torch.int64 and data.y_train.tolist() == sorted(data.y_train.tolist())
    assert torch.bincount(data.y_train).tolist() == [TRAIN_PER_CLASS] * 3
    assert torch.bincount(data.y_test).tolist() == [VAL_PER_CLASS] * 3
    assert data.x_train.path(9).endswith(os.path.join("n00000001", "img1.JPEG"))
    test = data.x_test[:]
    assert test.shape == (12, 3, 32, 32) and test.dtype == torch.float32
    # the colour survives decoding: class k's images are brightest in channel k
    channel = unnormalise(test).mean(dim=(2, 3)).argmax(1)
    assert torch.equal(channel, data.y_test)
    batch = data.x_train[torch.tensor([0, 9, 17])]
    assert batch.shape == (3, 3, 32, 32)
    assert unnormalise(batch).mean(dim=(2, 3)).argmax(1).tolist() == [0, 1, 2]
    spec = dataset_spec("imagenet", str(tree), image_size=32)
    assert spec.num_classes == 3 and spec.model_input_shape() == (3, 32, 32)
    assert dataset_spec("imagenet").input_shape == (3, 224, 224)  # the defaults without a folder


def test_test_view_is_torchvisions_resize_center_crop_to_tensor_normalize(tree):
    from torchvision import transforms

    data = dataset_factory("imagenet", str(tree), image_size=32)()
    reference = transforms.Compose(
        [
            transforms.Resize(37),  # 32 * 256 / 224, as Resize(256) is to CenterCrop(224)
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    for i in (0, 5, 11):
        with Image.open(data.x_test.path(i)) as image:
            expected = reference(image.convert("RGB"))
        assert torch.equal(data.x_test[[i]][0], expected)


def test_training_augmentation_follows_the_generator_not_the_threads(tree, monkeypatch):
    x = dataset_factory("imagenet", str(tree), image_size=24)().x_train
    index = torch.tensor([3, 8, 8, 20, 1])

    def draw(seed: int, threads: str) -> torch.Tensor:
        monkeypatch.setenv("LSGD_RAY_DECODE_THREADS", threads)
        return x.load(index, torch.Generator().manual_seed(seed))

    a = draw(7, "1")
    assert a.shape == (5, 3, 24, 24)
    torch.manual_seed(123)  # torch's global generator plays no part
    assert torch.equal(a, draw(7, "4"))
    assert not torch.equal(a, draw(8, "2"))
    assert not torch.equal(a[1], a[2])  # the same image twice in a batch: two different crops
    assert not torch.equal(a, x[index])  # the test view is not the training view
    # one draw from the generator per batch, whatever the batch size
    g = torch.Generator().manual_seed(7)
    x.load(index, g)
    after_one = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (1,), generator=after_one)
    assert torch.equal(g.get_state(), after_one.get_state())


def test_random_resized_crop_box_stays_inside_the_image():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(1, 80), rng.randint(1, 80)
        top, left, h, w = random_resized_crop_box(width, height, rng)
        assert 0 < h <= height and 0 < w <= width
        assert 0 <= top <= height - h and 0 <= left <= width - w


def test_subset_is_lazy(tree, monkeypatch):
    x = dataset_factory("imagenet", str(tree), image_size=16)().x_train
    opened = []
    real = data_module._open_image
    monkeypatch.setattr(data_module, "_open_image", lambda path: opened.append(path) or real(path))
    shard = x.subset(torch.tensor([23, 0, 9]))
    assert opened == [] and len(shard) == 3 and shard.shape == (3, 3, 16, 16)
    assert shard.subset([2]).path(0) == x.path(9)
    assert shard[torch.tensor([0, 2])].shape == (2, 3, 16, 16)
    assert sorted(opened) == sorted([x.path(23), x.path(9)])


def test_missing_or_misarranged_folders_say_how_to_get_imagenet(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        dataset_factory("imagenet", str(missing))
    message = str(info.value)
    assert f"{missing / 'train'} does not exist" in message and f"{missing / 'val'}" in message
    assert "cannot be downloaded automatically" in message and "ImageFolder" in message
    assert "valprep" in message and "image-net.org" in message
    (tmp_path / "flat" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match="val has no class folders"):
        dataset_factory("imagenet", str(tmp_path / "flat"))
    assert main(["--dataset", "imagenet", "--data-dir", str(missing)]) == 2
    assert "ImageNet not found in" in capsys.readouterr().err


def test_imagenet_options_are_checked(tree):
    with pytest.raises(ConfigError, match="own per-sample augmentation"):
        dataset_factory("imagenet", str(tree), augment="crop28-flip")
    with pytest.raises(ConfigError, match="imagenet' only"):
        dataset_factory("digits", image_size=32)
    with pytest.raises(ConfigError, match="at least 8 pixels"):
        dataset_factory("imagenet", str(tree), image_size=4)
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded"):
        dataset_factory("imagenet", str(tree), download=True)
    assert dataset_factory("imagenet", str(tree), augment="none", image_size=16)().input_shape == (3, 16, 16)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.timeout(120)
def test_fit_streams_the_tree_and_learns_the_colours(tree, tmp_path, local_ray):
    model = model_factory("cnn", (3, 32, 32), 3)
    data = dataset_factory("imagenet", str(tree), image_size=32)
    config = TrainConfig(
        num_groups=1,
        workers_per_group=2,
        batch_size=8,
        epochs=12,
        eval_every_s=5.0,
        lsgd=LSGDConfig(tau=2, tau_global=4, leader_estimate="val_batch"),  # also the val-batch path
        output_dir=str(tmp_path / "run"),
        quiet=True,
    )
    result = fit(model, data, config)
    assert result.status == "completed"
    assert result.steps_per_worker == 12 * 12 // 8  # 12 epochs of a 12-image shard
    assert result.final_test_accuracy > 0.6  # 3 classes: chance is 1/3


@pytest.mark.timeout(120)
def test_cli_trains_on_the_tree(tree, tmp_path, local_ray, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--dataset", "imagenet", "--data-dir", str(tree), "--image-size", "32", "--model", "cnn"]
    argv += ["--groups", "1", "--workers-per-group", "1", "--batch-size", "8", "--epochs", "4", "--quiet"]
    assert main([*argv, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["final_test_accuracy"] > 0.5


@pytest.mark.timeout(120)
def test_compare_reads_the_imagenet_config(tmp_path):
    """The shipped config parses and reaches the dataset (no ImageNet here: the clear error)."""
    missing = tmp_path / "imagenet"
    config = ROOT / "experiments" / "configs" / "imagenet_resnet50_4workers.json"
    settings = json.loads(config.read_text())
    assert settings["dataset"] == "imagenet" and settings["model"] == "resnet50"
    assert set(settings["algorithms"]) == {"lsgd", "easgd", "downpour", "data_parallel"}
    proc = subprocess.run(
        [sys.executable, "experiments/compare.py", "--config", str(config), "--data-dir", str(missing)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"),
    )
    assert proc.returncode != 0
    assert f"ImageNet not found in {missing}" in proc.stderr
