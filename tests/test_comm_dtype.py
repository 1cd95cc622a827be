"""``comm_dtype``: what travels, and what a worker makes of it. No Ray."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lsgd_ray import LSGDConfig, OptimizerConfig, TrainConfig, wire
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


def test_the_numpy_encoding_rounds_as_torch_does_and_widens_exactly():
    """The parameter server has no torch: its bfloat16 (lsgd_ray.wire) must be torch's, bit for bit."""
    rng = np.random.default_rng(1)
    scaled = rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)
    weights = np.concatenate([
        scaled.astype(np.float32),
        np.float32([0.0, -0.0, np.inf, -np.inf, 3.0e38, -3.4e38, 1e-40, 1.00390625, 1.01171875]),  # ties to even
        rng.integers(0, 2**32, 10_000, dtype=np.uint32).view(np.float32),  # any bit pattern
    ])  # fmt: skip
    nan = np.isnan(weights)
    ours = wire.encode(weights, "bfloat16")
    torch_bits = torch.from_numpy(weights).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(ours[~nan], torch_bits[~nan])
    assert nan.any() and np.isnan(wire.decode(ours)[nan]).all()  # a NaN stays a NaN
    widened = wire.decode(ours)
    assert widened.dtype == np.float32
    assert np.array_equal(widened[~nan], torch.from_numpy(torch_bits).view(torch.bfloat16).float().numpy()[~nan])
    assert wire.decode(weights) is weights  # float32 is as it travelled


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


def test_the_byte_theory_halves_for_the_algorithms_that_take_bfloat16():
    for algorithm in ("lsgd", "easgd", "local_sgd", "diloco"):
        f32 = TrainConfig(algorithm=algorithm, max_steps=1)
        bf16 = TrainConfig(algorithm=algorithm, max_steps=1, comm_dtype="bfloat16")
        assert expected_bytes(bf16, 1000, [2, 2])["received"] == pytest.approx(
            expected_bytes(f32, 1000, [2, 2])["received"] / 2
        ), algorithm
    for algorithm in ("downpour", "dpsgd", "aldsgd", "data_parallel"):
        with pytest.raises(ConfigError, match=f"comm_dtype 'bfloat16' is not implemented for {algorithm}"):
            TrainConfig(algorithm=algorithm, max_steps=1, comm_dtype="bfloat16")


# ---------------------------------------------------------------- averages in bfloat16 (two processes)


def _average_in_two_processes(rank: int, init: str, out: str) -> None:
    """Two local SGD workers in a gloo world of two: a global average in bfloat16, then a local
    one after rank 1's anchor was knocked apart (a reset would do that)."""
    torch.set_num_threads(1)
    worker = _worker("bfloat16", rank)
    worker.setup_collective(init, 2, [[0, 1]], "gloo", allreduce_grads=False)
    record = {"initial": worker.state.flat.clone()}  # the anchors: every worker starts from these
    worker.train(3)  # different shards: different weights
    record["before"] = worker.state.flat.clone()
    worker.average_weights("global")
    record["after"], record["bytes"] = worker.state.flat.clone(), worker.bytes_received
    worker.train(2)
    if rank == 1:
        worker._anchors["local"][0] += 1.0
    record["before_2"] = worker.state.flat.clone()
    worker.average_weights("local")
    record["after_2"], record["bytes_2"] = worker.state.flat.clone(), worker.bytes_received - record["bytes"]
    torch.save(record, f"{out}/{rank}.pt")
    worker.close_collective()


def test_local_sgd_averages_changes_in_bfloat16_and_falls_back_to_float32_when_anchors_differ(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_in_two_processes, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    S = r0["before"].numel() * 4
    digest = 24  # the anchors' checksum, all-reduced before each average (ring of 2: 24 bytes each way)
    # the anchors were the common initial weights: the change travelled in half the bytes
    assert torch.equal(r0["after"], r1["after"])  # every worker holds the same average, bit for bit
    exact = (r0["before"] + r1["before"]) / 2
    # each change rounded to bfloat16 (2^-9 of it), then their sum once more
    change = torch.maximum((r0["before"] - r0["initial"]).abs(), (r1["before"] - r1["initial"]).abs())
    assert ((r0["after"] - exact).abs() <= change * 2**-7 + 1e-7).all()
    assert not torch.equal(r0["after"], exact)  # it did travel in bfloat16
    assert r0["bytes"] == S // 2 + digest  # ring of 2 moves S/2 each way, in bfloat16
    # knocked-apart anchors: this one average runs exactly, in float32
    assert torch.equal(r0["after_2"], (r0["before_2"] + r1["before_2"]) / 2)
    assert torch.equal(r0["after_2"], r1["after_2"])
    assert r0["bytes_2"] == S + digest


def _a_mean_cut_short_by_a_lost_member(rank: int, init: str, out: str) -> None:
    """Two workers in a gloo world of two average 200 MB in float32; rank 1's process is
    SIGKILLed 30 ms into it, as a chaos run strikes a worker mid-average."""
    import os
    import signal
    import threading

    torch.set_num_threads(1)
    worker = _worker("float32", rank)
    worker.setup_collective(init, 2, [[0, 1]], "gloo", allreduce_grads=False)
    flat = torch.full((50_000_000,), float(rank + 1))
    torch.distributed.barrier()  # both start the average together
    if rank == 1:
        threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGKILL)).start()
    try:
        worker._mean_(flat, "global", None, 2)
        outcome = "completed"
    except RuntimeError as exc:
        outcome = f"failed: {exc}"
    torch.save({"outcome": outcome, "values": torch.unique(flat)}, f"{out}/{rank}.pt")


def test_an_average_cut_short_by_a_lost_member_leaves_the_weights_as_they_were(tmp_path):
    """A DiLoCo chaos run's collapse: a gloo all-reduce that fails (a member lost mid-way)
    leaves partial sums in its buffer; the survivor's weights were that buffer, and the round
    done again averaged half-summed weights. The average now works on a copy."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_a_mean_cut_short_by_a_lost_member, args=(r, f"file://{tmp_path}/rendezvous", str(tmp_path))
        )
        for r in (0, 1)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert processes[1].exitcode == -9, processes[1].exitcode  # SIGKILLed
    survivor = torch.load(tmp_path / "0.pt")
    assert survivor["outcome"].startswith("failed"), "the all-reduce ended before the kill: nothing was cut short"
    assert survivor["values"].tolist() == [1.0], survivor  # not 3.0 (1 + 2) where the sums had arrived
