"""DiLoCo's rules against their equations on hand-computed flat tensors, and a Worker's outer
state (fragments, checkpoint, copy) in this process. No Ray."""

from __future__ import annotations

import functools
from copy import deepcopy

import pytest
import torch

from lsgd_ray import DiLoCoConfig, LSGDConfig, OptimizerConfig, TrainConfig
from lsgd_ray._internal.protocol import WorkerSpec
from lsgd_ray._internal.worker import Worker
from lsgd_ray.algorithms import diloco
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.config import ConfigError
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp
from lsgd_ray.optim import build_optimizer

MODEL = functools.partial(mlp, (4,), 2, hidden=3)
DATA = functools.partial(synthetic, n_train=64, n_test=16, dim=4, num_classes=2)


def test_fragments_cover_the_weights_in_near_equal_contiguous_pieces():
    assert diloco.fragment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert diloco.fragment_bounds(8, 1) == [(0, 8)]
    with pytest.raises(ValueError, match="cannot cut 2 weights into 3 fragments"):
        diloco.fragment_bounds(2, 3)


def test_the_schedule_syncs_one_fragment_every_h_over_f_steps_round_robin():
    assert [diloco.outer_due(s, 8) for s in (4, 8, 16, 17)] == [None, 0, 0, None]
    assert [diloco.outer_due(s, 8, 4) for s in range(1, 19)] == [
        None, 0, None, 1, None, 2, None, 3, None, 0, None, 1, None, 2, None, 3, None, 0,
    ]  # fmt: skip
    # hierarchical: group averages at the multiples of τ where no outer step falls
    assert [s for s in range(1, 17) if diloco.local_due(s, 2, 8)] == [2, 4, 6, 10, 12, 14]
    assert not any(diloco.local_due(s, None, 8) for s in range(1, 17))
    assert [diloco.next_sync_step(s, 2, 8) for s in (0, 1, 2, 7)] == [2, 2, 4, 8]
    assert [diloco.next_sync_step(s, None, 8, 4) for s in (0, 2, 3)] == [2, 4, 4]


def test_the_outer_step_is_nesterov_sgd_on_the_pseudo_gradient_by_hand():
    """θ_g = [1, 2], the workers' means [0.5, 3] then [0, 1]; lr 0.7, momentum 0.9, Nesterov:
    b ← 0.9·b + Δ; θ_g ← θ_g − 0.7·(Δ + 0.9·b)."""
    leaf = torch.nn.Parameter(torch.tensor([1.0, 2.0]), requires_grad=False)
    outer = build_optimizer([leaf], OptimizerConfig(lr=0.7, momentum=0.9, nesterov=True, weight_decay=0.0))
    theta, buffer = [1.0, 2.0], [0.0, 0.0]
    for mean in ([0.5, 3.0], [0.0, 1.0]):
        averaged = torch.tensor(mean)
        with torch.no_grad():
            diloco.outer_step(leaf, outer, averaged)
        delta = [theta[i] - mean[i] for i in range(2)]
        buffer = [0.9 * buffer[i] + delta[i] for i in range(2)]
        theta = [theta[i] - 0.7 * (delta[i] + 0.9 * buffer[i]) for i in range(2)]
        torch.testing.assert_close(leaf.detach(), torch.tensor(theta), rtol=0, atol=1e-6)
        torch.testing.assert_close(averaged, torch.tensor(theta), rtol=0, atol=1e-6)  # where workers go on from


def test_outer_sgd_with_lr_1_and_no_momentum_is_the_plain_average():
    leaf = torch.nn.Parameter(torch.tensor([4.0, -2.0, 0.5]), requires_grad=False)
    outer = build_optimizer([leaf], OptimizerConfig(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0))
    mean = torch.tensor([1.0, 1.0, 1.0])
    with torch.no_grad():
        diloco.outer_step(leaf, outer, mean.clone())
    assert torch.equal(leaf.detach(), mean)


def test_bytes_per_worker_step_by_hand():
    """S = 100, 2 groups x 2, H = 16: a ring all-reduce over 4 (2·S·3/4) every 16 steps;
    hierarchical τ = 4: a ring over 2 (S) at 4, 8, 12 as well; streaming moves S/F every H/F."""
    flat = TrainConfig(algorithm="diloco", max_steps=1)
    assert expected_bytes(flat, 100, [2, 2])["received"] == pytest.approx(2 * 100 * 3 / 4 / 16)
    hierarchical = TrainConfig(algorithm="diloco", max_steps=1, diloco=DiLoCoConfig(tau=4))
    assert expected_bytes(hierarchical, 100, [2, 2])["received"] == pytest.approx(150 / 16 + 100 * 3 / 16)
    streaming = TrainConfig(algorithm="diloco", max_steps=1, diloco=DiLoCoConfig(fragments=4))
    assert expected_bytes(streaming, 100, [2, 2]) == expected_bytes(flat, 100, [2, 2])


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="fragments must divide tau_global"):
        DiLoCoConfig(tau_global=16, fragments=3)
    with pytest.raises(ConfigError, match="streams no fragments"):
        DiLoCoConfig(tau=4, fragments=2)
    with pytest.raises(ConfigError, match="tau .* must be shorter than tau_global"):
        DiLoCoConfig(tau=16, tau_global=16)
    with pytest.raises(ConfigError, match="outer must be an OptimizerConfig"):
        DiLoCoConfig(outer="sgd")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- a Worker's outer state


def _worker(fragments: int) -> Worker:
    spec = WorkerSpec(
        num_workers=1, batch_size=8, seed=0, lsgd=LSGDConfig(), optimizer=OptimizerConfig(lr=0.1),
        diloco=DiLoCoConfig(tau_global=4, fragments=fragments),
    )  # fmt: skip
    return Worker(0, 0, 0, MODEL, DATA, spec)


def test_streaming_steps_only_the_fragment_due_and_keeps_each_fragments_momentum():
    torch.set_num_threads(1)
    worker = _worker(fragments=2)
    (a0, b0, leaf0, _), (a1, b1, leaf1, _) = worker._outer
    assert (a0, b1) == (0, worker.state.flat.numel()) and b0 == a1
    before = [leaf0.detach().clone(), leaf1.detach().clone()]
    worker.train(2, outer=0)
    assert not torch.equal(leaf0.detach(), before[0]) and torch.equal(leaf1.detach(), before[1])
    assert torch.equal(worker.state.flat[a0:b0], leaf0.detach())  # fragment 0 goes on from the global
    worker.train(2, outer=1)
    assert torch.equal(worker.state.flat[a1 : a1 + leaf1.numel()], leaf1.detach())
    assert worker.exchanges == 2
    assert torch.equal(torch.from_numpy(worker.global_weights()), torch.cat([leaf0.detach(), leaf1.detach()]))


def test_the_outer_state_survives_a_checkpoint_and_a_copy_exactly():
    torch.set_num_threads(1)
    worker = _worker(fragments=2)
    for fragment in (0, 1, 0):
        worker.train(2, outer=fragment)
    saved = worker.get_state()
    # each its own copy, as each gets its own from a file or over Ray (torch's load_state_dict
    # keeps the very tensors it is given: in one process the workers would share momentum)
    again = _worker(fragments=2)
    again.set_state(deepcopy(saved))
    copy = _worker(fragments=2)
    copy.set_state({**deepcopy(saved), "outer": None})  # everything but the outer state...
    copy.restart_from_global(deepcopy(worker.outer_state()))  # ... which comes from a peer, as for a replacement
    itself = _worker(fragments=2)  # what the copy must equal: the same state, gone on from its own global weights
    itself.set_state(deepcopy(saved))
    itself.restart_from_global(deepcopy(itself.outer_state()))
    assert not torch.equal(itself.state.flat, worker.state.flat)  # the local weights were not the global ones
    for w in (worker, again, copy, itself):
        w.train(2, outer=1)
        w.train(2, outer=0)
    assert torch.equal(again.state.flat, worker.state.flat)
    assert torch.equal(copy.state.flat, itself.state.flat)
    fresh = _worker(fragments=2)  # a fresh outer momentum would not give the same weights
    fresh.set_state({**deepcopy(saved), "outer": None})
    fresh.train(2, outer=1)
    fresh.train(2, outer=0)
    assert not torch.equal(fresh.state.flat, worker.state.flat)
