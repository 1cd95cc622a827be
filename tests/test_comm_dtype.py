"""``comm_dtype``: what travels, and what a worker makes of it. No Ray."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig
from lsgd_ray._internal.protocol import WorkerSpec
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.config import ConfigError
from lsgd_ray.data import synthetic
from lsgd_ray.flat import as_tensor, decode, encode
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (4,), 2, hidden=8)
DATA = functools.partial(synthetic, n_train=64, n_test=16, dim=4, num_classes=2)


def test_float32_travels_as_it_is_and_bfloat16_in_half_the_bytes():
    weights = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert encode(weights, "float32") is weights and decode(as_tensor(weights)).dtype == torch.float32
    wire = encode(weights, "bfloat16")
    assert wire.dtype == np.int16 and wire.nbytes == weights.nbytes // 2
    back = decode(as_tensor(wire))
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, torch.from_numpy(weights).to(torch.bfloat16))  # round to nearest even, as torch does
    error = (back.float() - torch.from_numpy(weights)).abs() / torch.from_numpy(weights).abs()
    assert float(error.max()) <= 2**-8  # 8 bits of mantissa
    with pytest.raises(ValueError, match="comm_dtype"):
        encode(weights, "float16")


def _worker(comm_dtype: str, rank: int = 0, proximal: float = 0.0) -> Worker:
    spec = WorkerSpec(
        num_workers=2, batch_size=8, seed=0, lsgd=LSGDConfig(proximal=proximal), optimizer=OptimizerConfig(),
        comm_dtype=comm_dtype,
    )  # fmt: skip
    return Worker(rank, 0, rank, MODEL, DATA, spec)


def test_a_bfloat16_leader_is_published_in_half_the_bytes_and_pulled_toward_as_float32():
    torch.set_num_threads(1)
    leader, follower, exact = (
        _worker("bfloat16", 0),
        _worker("bfloat16", 1, proximal=0.5),
        _worker("float32", 1, proximal=0.5),
    )
    leader.train(5)
    follower.train(3)
    exact.train(3)
    assert torch.equal(follower.state.flat, exact.state.flat)
    published = leader.get_weights()
    assert published.dtype == np.int16 and leader.bytes_sent == leader.state.nbytes // 2 + 8
    assert leader.get_weights(count=False).dtype == np.float32  # evaluation and checks: full precision
    follower.pull(published, 0.5)
    exact.pull(leader.get_weights(count=False), 0.5)
    assert follower.bytes_received == exact.bytes_received // 2
    assert torch.allclose(follower.state.flat, exact.state.flat, rtol=2**-8, atol=1e-6)
    assert not torch.equal(follower.state.flat, exact.state.flat)  # it did travel in bfloat16
    assert follower.proximal.targets["global"].dtype == torch.float32
    follower.reset_to(published)  # a restart from a bfloat16 publication (a replacement's source)
    assert torch.equal(follower.state.flat, decode(as_tensor(published)).float())


def test_the_byte_theory_halves_and_only_lsgd_takes_bfloat16():
    f32 = TrainConfig(algorithm="lsgd", max_steps=1)
    bf16 = TrainConfig(algorithm="lsgd", max_steps=1, comm_dtype="bfloat16")
    assert expected_bytes(bf16, 1000, [2, 2])["received"] == pytest.approx(
        expected_bytes(f32, 1000, [2, 2])["received"] / 2
    )
    with pytest.raises(ConfigError, match="comm_dtype 'bfloat16' is not implemented for easgd"):
        TrainConfig(algorithm="easgd", max_steps=1, comm_dtype="bfloat16")
