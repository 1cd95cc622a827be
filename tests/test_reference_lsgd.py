"""LSGD as its authors' code runs it, checked without Ray.

The reference round below is written from the facts in the project's notes on the reference
code (yunfei-teng/LSGD): it is a transcription of what that code does, not of its text.
Our Workers are driven in this process the way their LocalLeader drives them.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from lsgd_ray import LSGDConfig, OptimizerConfig
from lsgd_ray._internal.protocol import WorkerSpec
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms.lsgd import pulls_due, select_leader
from lsgd_ray.cli import config_from_args, parse_args
from lsgd_ray.config import ConfigError
from lsgd_ray.data import BatchStream, DealtStream, batch_stream, shard_indices, synthetic, worker_seed
from lsgd_ray.models import mlp
from lsgd_ray.presets import PRESETS, preset_config

MODEL = functools.partial(mlp, (4,), 2, hidden=3)
DATA = functools.partial(synthetic, n_train=64, n_test=16, dim=4, num_classes=2)

# ---------------------------------------------------------------------------- shards re-dealt


@pytest.mark.parametrize(("n", "workers", "batch"), [(100, 3, 7), (64, 4, 16), (5, 8, 2)])
def test_dealt_shares_are_torchs_distributed_sampler_epoch_by_epoch(n, workers, batch):
    share = -(-n // workers)
    for rank in range(workers):
        stream = DealtStream(n, batch, seed=11, num_workers=workers, rank=rank)
        drawn = torch.cat([stream.next() for _ in range(3 * share // batch + 1)]).tolist()
        sampler = DistributedSampler(range(n), num_replicas=workers, rank=rank, shuffle=True, seed=11)
        expected = []
        for epoch in range(4):
            sampler.set_epoch(epoch)
            expected += list(sampler)
        assert drawn == expected[: len(drawn)], f"rank {rank}"
        assert stream.n == share and stream.epoch == len(drawn) // share - (len(drawn) % share == 0)


def test_every_epoch_the_ranks_split_the_whole_set_anew():
    n, workers = 60, 3
    streams = [DealtStream(n, 20, seed=0, num_workers=workers, rank=r) for r in range(workers)]
    epochs = [[set(s.next().tolist()) for s in streams] for _ in range(2)]
    for shares in epochs:
        assert set().union(*shares) == set(range(n)) and sum(map(len, shares)) == n
    assert epochs[0][0] != epochs[1][0]  # rank 0 sees other samples in its second epoch


def test_a_dealt_stream_continues_exactly_from_its_state():
    stream = DealtStream(50, 8, seed=2, num_workers=2, rank=1)
    for _ in range(5):  # into the second epoch (25 per share)
        stream.next()
    again = DealtStream(50, 8, seed=2, num_workers=2, rank=1)
    again.load_state(stream.state())
    assert [stream.next().tolist() for _ in range(6)] == [again.next().tolist() for _ in range(6)]
    with pytest.raises(ValueError, match="re-dealt"):
        DealtStream(51, 8, seed=2, num_workers=2, rank=1).load_state(stream.state())
    with pytest.raises(ValueError, match="fixed shard"):
        BatchStream(25, 8, seed=0).load_state(stream.state())


def test_fixed_shards_are_unchanged_by_the_option():
    rows, stream = batch_stream(100, 8, 4, 3, 2, redeal=False)
    assert torch.equal(rows, shard_indices(100, 3, 2, 4))
    reference = BatchStream(len(rows), 8, worker_seed(4, 2))
    assert all(torch.equal(stream.next(), reference.next()) for _ in range(10))
    rows, stream = batch_stream(100, 8, 4, 3, 2, redeal=True)
    assert rows is None and isinstance(stream, DealtStream)


# ---------------------------------------------------------------------------- the reference round

SIZE = sum(p.numel() for p in MODEL().parameters())
CENTERS = [torch.linspace(-1, 1, SIZE) * (k + 1) * 0.7 + k for k in range(4)]  # a minimum per worker


class QuadraticWorker(Worker):
    """A Worker whose local step is a gradient step on ``|x − c_rank|²`` (deterministic, so the
    reference can take the very same steps); pulls, proximal pull and estimates are the Worker's."""

    def _local_step(self) -> torch.Tensor:
        x = self.state.flat
        with torch.no_grad():
            loss = ((x - CENTERS[self.rank]) ** 2).sum()
            x.sub_(0.2 * (x - CENTERS[self.rank]))
        return loss


def reference_rounds(x0, groups, steps, cfg, order=("global", "local"), leader_stores_own=True):
    """The reference code's LSGD on flat tensors: after every SGD step, the proximal pull toward
    the stored global leader (p/τ_G), then toward the stored local leader (p/τ); every τ steps
    the local pull (x ← (1−λ)x + λ·x̃_j) and every τ_G the global one (λ_G), local first; at each
    pull every worker of it, the leader too, stores the leader's weights; before the first pull
    both stores hold the initial weights. Leaders: lowest mean loss over the last k batches.
    One group (one node): only the global leader acts, so there is no local pull or store."""
    ranks = [r for group in groups for r in group]
    x = {r: x0.clone() for r in ranks}
    kinds = [kind for kind in order if kind == "global" or len(groups) > 1]
    stored = {r: dict.fromkeys(kinds, x0.clone()) for r in ranks}
    losses = {r: [] for r in ranks}
    strength = {"global": cfg.proximal / cfg.tau_global, "local": cfg.proximal / cfg.tau}
    for step in range(1, steps + 1):
        for r in ranks:
            losses[r].append(float(((x[r] - CENTERS[r]) ** 2).sum()))
            x[r] = x[r] - 0.2 * (x[r] - CENTERS[r])
            for kind in kinds:
                x[r] = (1 - strength[kind]) * x[r] + strength[kind] * stored[r][kind]
        mean = {r: sum(losses[r][-cfg.loss_window :]) / len(losses[r][-cfg.loss_window :]) for r in ranks}
        local_leaders = [min(group, key=mean.get) for group in groups]
        if step % cfg.tau == 0 and len(groups) > 1:
            for group, leader in zip(groups, local_leaders):
                snapshot = x[leader].clone()
                for r in group:
                    x[r] = (1 - cfg.lam) * x[r] + cfg.lam * snapshot
                    if r != leader or leader_stores_own:
                        stored[r]["local"] = snapshot
        if step % cfg.tau_global == 0:
            best = min(local_leaders, key=mean.get)
            snapshot = x[best].clone()
            for r in ranks:
                x[r] = (1 - cfg.lam_global) * x[r] + cfg.lam_global * snapshot
                if r != best or leader_stores_own:
                    stored[r]["global"] = snapshot
    return x


def our_rounds(groups, steps, cfg):
    """Our Workers, in this process, driven as their LocalLeaders drive them in synchronous
    mode: the pulls decided after round r travel with round r+1's ``train``; a leader is sent its
    own snapshot with strength 0."""
    spec = WorkerSpec(
        num_workers=sum(map(len, groups)), batch_size=4, seed=0, lsgd=cfg, num_groups=len(groups),
        optimizer=OptimizerConfig(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
    )  # fmt: skip
    workers = {
        r: QuadraticWorker(r, g, i, MODEL, DATA, spec) for g, group in enumerate(groups) for i, r in enumerate(group)
    }

    def publish(rank):  # what Ray does to a leader's weights: an immutable copy in the object store
        array = workers[rank].get_weights().copy()
        array.flags.writeable = False
        return array

    pulls = {r: (None, 0.0, None, 0.0) for r in workers}
    for round_end in range(cfg.tau, steps + 1, cfg.tau):
        estimates = {r: w.train(cfg.tau, *pulls[r])["estimate"] for r, w in workers.items()}
        local, global_ = pulls_due(round_end, cfg.tau, cfg.tau_global, len(groups))
        leaders = [group[select_leader([estimates[r] for r in group])] for group in groups]
        best = leaders[select_leader([estimates[r] for r in leaders])]
        for group, leader in zip(groups, leaders):
            local_ref = publish(leader) if local else None
            for r in group:
                pulls[r] = (local_ref, 0.0 if r == leader else cfg.lam, None, 0.0)
        if global_:
            global_ref = publish(best)
            pulls = {r: (*pulls[r][:2], global_ref, 0.0 if r == best else cfg.lam_global) for r in workers}
    for r, w in workers.items():
        w.apply_pulls(*pulls[r])
    return {r: w.state.flat.clone() for r, w in workers.items()}


@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0, 1, 2, 3]]], ids=["2x2", "1x4"])
def test_communication_rounds_match_the_reference(groups):
    """12 steps with τ = 2, τ_G = 4: six local communications and three global ones, the
    proximal pull after every step, leaders changing as the loss windows move."""
    torch.set_num_threads(1)
    cfg = LSGDConfig(lam=0.3, lam_global=0.2, tau=2, tau_global=4, proximal=0.5, loss_window=3)
    ours = our_rounds(groups, 12, cfg)
    torch.manual_seed(0)
    x0 = torch.nn.utils.parameters_to_vector(MODEL().parameters()).detach()
    reference = reference_rounds(x0, groups, 12, cfg)
    for r in ours:
        torch.testing.assert_close(ours[r], reference[r], rtol=1e-6, atol=1e-6, msg=f"worker {r}")
    if len(groups) > 1:  # the test sees the order of the two proximal pulls and the leader's own store
        for variant in (dict(order=("local", "global")), dict(leader_stores_own=False)):
            other = reference_rounds(x0, groups, 12, cfg, **variant)
            assert any(not torch.allclose(ours[r], other[r], rtol=1e-5, atol=1e-5) for r in ours), variant


def test_a_worker_reset_starts_its_proximal_targets_from_the_weights_it_restarts_from():
    cfg = LSGDConfig(tau=2, tau_global=4, proximal=0.5)
    spec = WorkerSpec(num_workers=1, batch_size=4, seed=0, lsgd=cfg, num_groups=2, optimizer=OptimizerConfig())
    worker = QuadraticWorker(0, 0, 0, MODEL, DATA, spec)
    assert worker.proximal is not None and set(worker.proximal.targets) == {"global", "local"}
    worker.train(3)
    restart = torch.full_like(worker.state.flat, 0.25)
    worker.reset_to(restart.numpy())
    for target in worker.proximal.targets.values():
        assert torch.equal(target, restart)
    state = worker.get_state()
    assert set(state["proximal_targets"]) == {"global", "local"}
    again = QuadraticWorker(0, 0, 0, MODEL, DATA, spec)
    again.set_state(state)
    worker.train(4)
    again.train(4)
    assert torch.equal(worker.state.flat, again.state.flat)
    assert math.isfinite(worker.estimate())


# ---------------------------------------------------------------------------- presets


def test_the_reference_presets_hold_the_reference_numbers():
    lsgd = preset_config("reference-lsgd", time_budget_s=60)
    assert (lsgd.algorithm, lsgd.mode, lsgd.redeal_shards, lsgd.batch_size) == ("lsgd", "sync", True, 128)
    c = lsgd.lsgd
    assert (c.lam, c.lam_global, c.proximal, c.evaluate, c.loss_window) == (0.1, 0.1, 0.1, "center", 10)
    assert c.tau * 4 == c.tau_global
    o = lsgd.optimizer
    assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.9, True, 1e-4)
    easgd = preset_config("reference-easgd", epochs=1)
    assert (easgd.algorithm, easgd.easgd.alpha, easgd.easgd.mode, easgd.redeal_shards) == ("easgd", 0.43, "sync", True)
    assert all(p.source and p.description for p in PRESETS.values())


def test_a_preset_takes_overrides_and_refuses_what_it_cannot_be():
    cfg = preset_config("reference-lsgd", max_steps=5, lsgd={"tau_global": 64, "tau": 16})
    assert (cfg.lsgd.tau, cfg.lsgd.tau_global, cfg.lsgd.proximal) == (16, 64, 0.1)
    whole = preset_config("reference-lsgd", max_steps=5, lsgd=LSGDConfig(tau=3))
    assert whole.lsgd == LSGDConfig(tau=3)
    with pytest.raises(ConfigError, match="set a budget"):
        preset_config("reference-lsgd")
    with pytest.raises(ConfigError, match="preset must be one of: reference-easgd, reference-lsgd, got 'lsgd'"):
        preset_config("lsgd", epochs=1)
    with pytest.raises(ConfigError, match="lsgd: .*unexpected keyword argument 'taus'"):
        preset_config("reference-lsgd", epochs=1, lsgd={"taus": 3})


def test_the_command_line_preset_sets_defaults_and_explicit_flags_win():
    cfg = config_from_args(parse_args(["train", "--preset", "reference-lsgd", "--lr", "0.01", "--tau-global", "64"]))
    assert cfg.lsgd.proximal == 0.1 and cfg.lsgd.evaluate == "center" and cfg.redeal_shards
    assert (cfg.optimizer.lr, cfg.lsgd.tau_global, cfg.lsgd.tau, cfg.batch_size) == (0.01, 64, 4, 128)
    assert config_from_args(parse_args(["train", "--preset", "reference-easgd"])).easgd.alpha == 0.43
    plain = config_from_args(parse_args(["train", "--redeal-shards"]))
    assert plain.redeal_shards and plain.lsgd.proximal == 0.0
    with pytest.raises(ConfigError, match="--preset reference-lsgd is a configuration of lsgd, not of --algorithm"):
        config_from_args(parse_args(["train", "--preset", "reference-lsgd", "--algorithm", "easgd"]))
