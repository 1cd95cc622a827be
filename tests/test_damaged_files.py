"""Damaged files at random (hypothesis): checkpoints, MNIST idx files, CIFAR-10 batches and
images with bytes flipped or cut off. Each is read as it was, or refused with an error whose
message starts with the file's path (a checkpoint: the previous one is used); nothing else is
raised, nothing runs, nothing hangs. No Ray."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsgd_ray.checkpoint import CheckpointError, load_latest, read_checkpoint, save_checkpoint
from lsgd_ray.data import DatasetFileError, check_idx, read_cifar_batch
from lsgd_ray.data.streamed import _open_image

EXAMPLES = 150
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
# a damage: flip some bytes (position as a fraction of the file, new value), or cut the file
FLIPS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4)
DAMAGE = st.one_of(st.tuples(st.just("flip"), FLIPS), st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)))


def damage(path: Path, how) -> bool:
    """Damage ``path`` in place; whether its bytes changed at all."""
    data = bytearray(path.read_bytes())
    before = bytes(data)
    kind, arg = how
    if kind == "cut":
        data = data[: int(arg * len(data))]
    else:
        for where, value in arg:
            data[int(where * len(data))] = value
    path.write_bytes(bytes(data))
    return bytes(data) != before


def _starts_with_path(message: str, path: Path) -> None:
    assert message.startswith(str(path)), message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("damaged")


# ------------------------------------------------------------------ checkpoints


def _two_checkpoints(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for step, value in ((10, 1.0), (20, 2.0)):
        state = {"workers": [{"weights": torch.full((64,), value)}], "trainer": {"history": []}}
        latest = save_checkpoint(root, step, state, {"config": {}}, 3)
    return latest


@SETTINGS
@given(how=DAMAGE, which=st.sampled_from(["state.pt", "meta.json"]))
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(workdir, how, which):
    """The state is covered by the digest in meta.json; meta.json itself may survive a damage
    that leaves its JSON and digest intact (a changed note): then the state loads as saved."""
    latest = _two_checkpoints(workdir / "ckpt")
    changed = damage(latest / which, how)
    try:
        read_checkpoint(latest)
    except CheckpointError as refused:
        _starts_with_path(str(refused), latest)
        state, where = load_latest(workdir / "ckpt")
        assert where.name == "step-000000010" and float(state["workers"][0]["weights"][0]) == 1.0
        return
    assert which == "meta.json" or not changed  # any change to the state fails its digest
    state, where = load_latest(workdir / "ckpt")
    assert where == latest and float(state["workers"][0]["weights"][0]) == 2.0


@SETTINGS
@given(how=DAMAGE)
def test_a_damaged_checkpoint_with_a_matching_digest_loads_as_data_or_is_refused(workdir, how):
    """Someone rewrote the digest too: the weights-only loader is all that stands between."""
    latest = _two_checkpoints(workdir / "ckpt-digest")
    damage(latest / "state.pt", how)
    import hashlib

    meta = json.loads((latest / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256((latest / "state.pt").read_bytes()).hexdigest()
    (latest / "meta.json").write_text(json.dumps(meta))
    try:
        state = read_checkpoint(latest)
    except CheckpointError as exc:
        _starts_with_path(str(exc), latest)
        return
    assert isinstance(state, dict)


# ------------------------------------------------------------------ MNIST idx files


def _idx(path: Path, shape: tuple[int, ...]) -> None:
    header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(header + np.arange(int(np.prod(shape)), dtype=np.uint8).tobytes())


@SETTINGS
@given(how=DAMAGE, kind=st.sampled_from([("train-images-idx3-ubyte", (5, 28, 28)), ("t10k-labels-idx1-ubyte", (7,))]))
def test_a_damaged_idx_file_is_refused_naming_it_unless_only_its_pixels_changed(workdir, how, kind):
    name, shape = kind
    path = workdir / name
    _idx(path, shape)
    header = 4 + 4 * len(shape)
    damage(path, how)
    data = path.read_bytes()
    intact_header = data[:header] == bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    try:
        check_idx(path)
    except DatasetFileError as exc:
        _starts_with_path(str(exc), path)
        assert not (intact_header and len(data) == header + int(np.prod(shape)))
        return
    assert intact_header and len(data) == header + int(np.prod(shape))  # only pixel values changed


# ------------------------------------------------------------------ CIFAR-10 batches


@SETTINGS
@given(how=DAMAGE)
def test_a_damaged_cifar_batch_is_read_or_refused_naming_it(workdir, how):
    path = workdir / "data_batch_1"
    rng = np.random.default_rng(0)
    batch = {
        b"labels": [int(v) for v in rng.integers(0, 10, 4)],
        b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    damage(path, how)
    try:
        images, labels = read_cifar_batch(path)
    except DatasetFileError as exc:
        _starts_with_path(str(exc), path)
        return
    assert images.shape[1:] == (3, 32, 32) and len(labels) == len(images)


# ------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def image_bytes(workdir):
    from PIL import Image

    out = {}
    for fmt in ("PNG", "JPEG"):
        path = workdir / f"picture.{fmt.lower()}"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, fmt)
        out[fmt] = path.read_bytes()
    return out


@SETTINGS
@given(how=DAMAGE, fmt=st.sampled_from(["PNG", "JPEG"]))
def test_a_damaged_image_is_decoded_or_refused_naming_it(workdir, image_bytes, how, fmt):
    path = workdir / f"damaged.{fmt.lower()}"
    path.write_bytes(image_bytes[fmt])
    damage(path, how)
    try:
        image = _open_image(str(path))
    except DatasetFileError as exc:
        _starts_with_path(str(exc), path)
        return
    assert image.mode == "RGB"
