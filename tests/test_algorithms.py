"""The LSGD update rules on flat tensors, without Ray."""

import math

import numpy as np
import pytest
import torch

from lsgd_ray.algorithms.lsgd import (
    LossWindow,
    crossed,
    next_pull_step,
    pull_toward,
    pulls_due,
    select_leader,
    sync_round,
    weighted_mean,
)


def test_pull_toward_matches_equation():
    x = torch.tensor([1.0, -2.0, 4.0])
    leader = torch.tensor([0.0, 2.0, 4.0])
    expected = x - 0.25 * (x - leader)
    out = pull_toward(x, leader, 0.25)
    assert out is x  # in place
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)


def test_pull_strength_zero_and_one():
    x = torch.randn(100)
    before = x.clone()
    leader = torch.randn(100)
    pull_toward(x, leader, 0.0)
    assert torch.equal(x, before)
    pull_toward(x, leader, 1.0)
    assert torch.equal(x, leader)


def test_select_leader_lowest_finite_first_on_ties():
    assert select_leader([3.0, 1.0, 2.0]) == 1
    assert select_leader([1.0, 1.0]) == 0
    assert select_leader([math.nan, 5.0, math.inf]) == 1  # NaN / inf never lead
    assert select_leader([math.nan, math.inf]) == -1
    assert select_leader([]) == -1


def test_loss_window_mean_of_last_k():
    w = LossWindow(3)
    assert w.mean() == math.inf
    for v in [10.0, 1.0, 2.0, 3.0]:
        w.add(v)
    assert w.mean() == pytest.approx(2.0)
    w.add(math.nan)
    assert w.mean() == math.inf  # a diverging worker cannot lead
    for v in [1.0, 1.0, 1.0]:
        w.add(v)
    assert w.mean() == 1.0


def test_schedule_sync():
    # two groups: local every 4, global every 16
    assert pulls_due(4, 4, 16, 2) == (True, False)
    assert pulls_due(16, 4, 16, 2) == (True, True)
    assert pulls_due(5, 4, 16, 2) == (False, False)
    # one group: only the global leader acts
    assert pulls_due(4, 4, 16, 1) == (False, False)
    assert pulls_due(16, 4, 16, 1) == (False, True)
    assert next_pull_step(0, 4, 16, 2) == 4
    assert next_pull_step(13, 4, 16, 2) == 16
    assert next_pull_step(0, 4, 16, 1) == 16
    assert next_pull_step(0, 6, 4, 2) == 4  # periods need not divide each other
    assert next_pull_step(4, 6, 4, 2) == 6


def test_crossed():
    assert crossed(15, 16, 16)
    assert crossed(10, 40, 16)
    assert not crossed(16, 31, 16)
    assert not crossed(0, 0, 4)


def test_center_from_group_means_is_the_plain_mean_of_all_workers():
    # group A: 3 workers, group B: 1 worker (float32 flat buffers, as the workers' get_weights)
    group_a = [np.array(v, np.float32) for v in ([1.0, -2.0, 0.5], [2.0, 0.0, 0.5], [6.0, 5.0, 2.0])]
    group_b = [np.array([11.0, 1.0, -5.0], np.float32)]
    mean_a = weighted_mean(group_a, [1, 1, 1])
    np.testing.assert_array_equal(mean_a, np.array([3.0, 1.0, 1.0], np.float32))  # (1+2+6)/3, (-2+0+5)/3, 3/3
    assert mean_a.dtype == np.float32
    mean_b = weighted_mean(iter(group_b), [1])  # any iterable: the GlobalLeader fetches one at a time
    center = weighted_mean(iter([mean_a, mean_b]), [3, 1])
    # by hand: (3·3 + 11)/4, (3·1 + 1)/4, (3·1 − 5)/4; unweighted means of the two groups would differ
    np.testing.assert_array_equal(center, np.array([5.0, 1.0, -0.5], np.float32))
    np.testing.assert_allclose(center, np.mean(np.stack(group_a + group_b), axis=0), rtol=0, atol=1e-7)
    assert center.dtype == np.float32
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_mean([], [])


def test_sync_round_by_hand():
    """Two groups of two workers, both pulls due: the equations of DESIGN.md, element by element."""
    x = [[torch.tensor([0.0, 0.0]), torch.tensor([4.0, 8.0])], [torch.tensor([2.0, 2.0]), torch.tensor([-2.0, 6.0])]]
    estimates = [[0.5, 0.9], [0.7, 0.3]]  # local leaders (0,0) and (1,1); global leader (1,1)
    lam, lam_g = 0.5, 0.25
    local_leaders, global_leader = sync_round(x, estimates, lam, lam_g, local=True, global_=True)
    assert local_leaders == [0, 1] and global_leader == (1, 1)
    g = torch.tensor([-2.0, 6.0])
    # local pull: (0,1) toward (0,0); (1,0) toward (1,1); leaders stay put
    x01 = torch.tensor([4.0, 8.0]) - lam * (torch.tensor([4.0, 8.0]) - torch.tensor([0.0, 0.0]))  # [2, 4]
    x10 = torch.tensor([2.0, 2.0]) - lam * (torch.tensor([2.0, 2.0]) - g)  # [0, 4]
    x00 = torch.tensor([0.0, 0.0])
    # global pull: everybody toward (1,1)
    expected = [[v - lam_g * (v - g) for v in (x00, x01)], [x10 - lam_g * (x10 - g), g]]
    for group, group_expected in zip(x, expected):
        for got, want in zip(group, group_expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(x[0][0], torch.tensor([-0.5, 1.5]))
    torch.testing.assert_close(x[0][1], torch.tensor([1.0, 4.5]))


def test_sync_round_nan_worker_never_leads():
    x = [[torch.zeros(2), torch.ones(2)]]
    local_leaders, global_leader = sync_round(x, [[math.nan, 2.0]], 0.5, 0.5, local=False, global_=True)
    assert global_leader == (0, 1)
    torch.testing.assert_close(x[0][0], torch.full((2,), 0.5))


def test_all_finite_sees_any_nan_or_infinity_in_one_pass():
    from lsgd_ray.flat import all_finite

    flat = torch.randn(10_000)
    assert all_finite(flat)
    assert all_finite(torch.full((1000,), 1e30))  # large but finite weights still pass
    for bad in (math.nan, math.inf, -math.inf):
        broken = flat.clone()
        broken[7_777] = bad
        assert not all_finite(broken), bad
    both = flat.clone()
    both[0], both[1] = math.inf, -math.inf  # their sum is NaN, not a cancellation to a number
    assert not all_finite(both)
