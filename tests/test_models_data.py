"""The paper's models, the whole-batch augmentation and the CIFAR-10 reader (no Ray)."""

import os
import pickle

import numpy as np
import pytest
import torch

from lsgd_ray.augment import AUGMENTS, Augment, center_crop, random_crop, random_flip
from lsgd_ray.config import ConfigError
from lsgd_ray.data import DatasetFileError, DatasetNotFoundError, cifar10, dataset_factory, read_cifar_batch
from lsgd_ray.models import MODELS, model_factory


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name,shape,params",
    [
        ("cnn7", (3, 28, 28), 351_946),  # 64·3·25+64 + 128·64·25+128 + 64·128·9+64 + 256·256+256 + 256·10+10
        ("cnn7", (1, 28, 28), 348_746),  # the same network on Fashion-MNIST
        ("resnet20", (3, 32, 32), 269_722),  # the paper's 0.27 M
        ("vgg16", (3, 32, 32), 14_990_922),
        ("vgg16", (3, 28, 28), 14_990_922),  # pools round up: 28x28 crops end at 1x1 too
        ("resnet50", (3, 64, 64), 23_528_522),  # torchvision's, 10 classes
    ],
)
def test_models_have_the_published_size_and_shape(name, shape, params):
    torch.manual_seed(0)
    model = MODELS[name](shape, 10).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_cnn7_layers_follow_the_reference():
    layers = [m for m in MODELS["cnn7"]((3, 28, 28), 10).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    shapes = [(tuple(m.weight.shape)) for m in layers]
    assert shapes == [(64, 3, 5, 5), (128, 64, 5, 5), (64, 128, 3, 3), (256, 256), (10, 256)]


def test_models_refuse_inputs_they_cannot_take():
    with pytest.raises(ConfigError, match="cnn7.*at least 24x24"):
        model_factory("cnn7", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="needs image inputs"):
        model_factory("resnet20", (16,), 4)
    with pytest.raises(ConfigError, match="unknown model 'vgg19'; choose one of"):
        model_factory("vgg19", (3, 32, 32), 10)


# ---------------------------------------------------------------------- augmentation


def test_random_crop_takes_each_image_at_its_own_offset():
    x = torch.arange(4 * 2 * 6 * 6, dtype=torch.float32).view(4, 2, 6, 6)
    out = random_crop(x, 4, 0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    top, left = torch.randint(0, 3, (4,), generator=g), torch.randint(0, 3, (4,), generator=g)
    for i in range(4):
        assert torch.equal(out[i], x[i, :, top[i] : top[i] + 4, left[i] : left[i] + 4])
    padded = random_crop(x, 6, 2, torch.Generator().manual_seed(0))
    assert padded.shape == x.shape and (padded == 0).any()  # zero padding shows at shifted crops


def test_flip_center_crop_and_determinism():
    x = torch.randn(64, 3, 8, 8)
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 10 < sum(mirrored) < 54
    assert torch.equal(center_crop(x, 4), x[:, :, 2:6, 2:6])
    aug = Augment(crop=6)
    a, b = aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (64, 3, 6, 6)
    assert aug.test(x).shape == (64, 3, 6, 6) and aug.output_shape((3, 8, 8)) == (3, 6, 6)
    assert AUGMENTS["none"] is None and AUGMENTS["crop28-flip"] == Augment(crop=28, padding=0, flip=True)


# ---------------------------------------------------------------------- CIFAR-10 python batches


def write_cifar(root, per_batch=20, seed=0):
    """The original format: pickled dicts with bytes keys, uint8 rows of 3072 values."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_reads_the_original_batches(tmp_path):
    folder = write_cifar(tmp_path)
    images, labels = read_cifar_batch(folder / "data_batch_2")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8 and labels.shape == (20,)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert np.array_equal(images.reshape(20, -1), raw[b"data"])  # rows are channel-major 3x32x32
    data = cifar10(tmp_path)
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert data.input_shape == (3, 28, 28)  # the reference's crop is the default
    assert abs(float(data.x_train.mean())) < 0.5  # normalised
    plain = dataset_factory("cifar10", str(tmp_path), augment="pad4-crop-flip")()
    assert plain.input_shape == (3, 32, 32) and plain.augment.padding == 4


def test_cifar10_refuses_code_in_a_data_file(tmp_path):
    folder = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(
        DatasetFileError, match=r"test_batch: not a CIFAR-10 python batch \(UnpicklingError: refusing to load .*system"
    ):
        cifar10(tmp_path)


def test_cifar10_missing_files_say_how_to_get_them(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_3.*cifar-10-python.tar.gz"):
        dataset_factory("cifar10", str(tmp_path))
    with pytest.raises(ConfigError, match="augment 'crop28-flip' needs image data"):
        dataset_factory("synthetic", augment="crop28-flip")
    with pytest.raises(ConfigError, match="crops 28 pixels"):
        dataset_factory("digits", augment="crop28-flip")


def test_digits_are_scikit_learns_read_without_importing_it():
    """Every worker loads the digits: importing sklearn would cost each about a second of CPU."""
    import subprocess
    import sys

    code = (
        "import sys; from lsgd_ray.data import digits; d = digits(); "
        "print(len(d.y_train) + len(d.y_test), 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1797", "False"]
    from sklearn.datasets import load_digits

    from lsgd_ray.data.in_memory import _digits_arrays

    bunch = load_digits()
    images, target = _digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)
