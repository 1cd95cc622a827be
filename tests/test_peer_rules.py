"""The peers' update rules against their equations, on hand-computed cases (no Ray)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsgd_ray.algorithms import data_parallel, downpour, easgd, gossip, local_sgd


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_easgd_elastic_exchange_by_hand():
    x1, x2, center = t(1.0, 2.0), t(3.0, -2.0), t(0.0, 0.0)
    alpha = easgd.moving_rate(0.9, 2)
    assert alpha == pytest.approx(0.45)
    d1 = easgd.elastic_worker_step(x1, center, alpha)
    d2 = easgd.elastic_worker_step(x2, center, alpha)
    torch.testing.assert_close(x1, t(0.55, 1.1))  # x − α(x − x̃)
    torch.testing.assert_close(x2, t(1.65, -1.1))
    easgd.elastic_center_step(center, [d1, d2], alpha)
    torch.testing.assert_close(center, t(0.45 * 4, 0.0))  # x̃ + α Σ (x_i − x̃), old values
    # the same rule on NumPy (the parameter server's arrays)
    c = np.zeros(2, dtype=np.float32)
    easgd.elastic_center_step(c, [np.array([1.0, 2.0], np.float32)], 0.5)
    np.testing.assert_allclose(c, [0.5, 1.0])
    assert easgd.expected_bytes(100, 4) == {"sent": 25.0, "received": 25.0}


def test_easgd_with_alpha_zero_leaves_everyone_alone():
    x, center = t(1.0, 2.0), t(5.0, 5.0)
    d = easgd.elastic_worker_step(x, center, 0.0)
    easgd.elastic_center_step(center, [d], 0.0)
    torch.testing.assert_close(x, t(1.0, 2.0))
    torch.testing.assert_close(center, t(5.0, 5.0))


def test_downpour_push_and_fetch_by_hand():
    server, x = t(1.0, 1.0), t(1.0, 1.0)
    base = x.clone()
    x -= t(0.1, 0.2)  # two local steps' worth of change
    x -= t(0.1, 0.0)
    update = downpour.accumulated_update(x, base)
    torch.testing.assert_close(update, t(-0.2, -0.2))
    downpour.apply_update(server, update)
    downpour.apply_update(server, t(0.5, 0.0))  # another worker's push
    torch.testing.assert_close(server, t(1.3, 0.8))
    assert downpour.due(8, 4) and not downpour.due(6, 4)
    assert downpour.expected_bytes(64, 4, 8) == {"sent": 16.0, "received": 8.0}


def test_downpour_server_rules_by_hand():
    """ "sum" adds each push whole (Dean et al.); "mean" adds it over W, so one push from each of
    the W workers moves the server by their average change; with one worker they agree."""
    assert downpour.server_scale("sum", 4) == 1.0 and downpour.server_scale("mean", 4) == 0.25
    assert downpour.server_scale("mean", 1) == downpour.server_scale("sum", 1) == 1.0
    pushes = [t(0.4, -0.8), t(0.0, 0.4), t(-0.4, 0.0), t(0.8, 0.0)]
    for rule, expected in [("sum", t(1.8, 0.6)), ("mean", t(1.2, 0.9))]:
        server = t(1.0, 1.0)
        for push in pushes:
            downpour.apply_update(server, push, downpour.server_scale(rule, len(pushes)))
        torch.testing.assert_close(server, expected)


def test_local_sgd_largest_due_period_wins():
    scopes = [local_sgd.averaging_scope(s, 2, 8) for s in range(1, 17)]
    assert scopes == [None, "local", None, "local", None, "local", None, "global"] * 2
    assert local_sgd.next_averaging_step(3, 2, 8) == 4 and local_sgd.next_averaging_step(7, 4, 6) == 8
    xs = [t(1.0, 0.0), t(3.0, 4.0)]
    local_sgd.average_(xs)
    assert all(torch.equal(x, t(2.0, 2.0)) for x in xs)
    # 2 groups of 2, τ=2, τ_G=8: local averages on 3 of every 4 even steps, ring of 2 moves S each way
    expected = local_sgd.expected_bytes(800, [2, 2], 2, 8)
    assert expected["received"] == pytest.approx(3 / 8 * 800 + 2 * 800 * 3 / 4 / 8)


def test_ring_allreduce_volume():
    assert data_parallel.ring_allreduce_bytes(1000, 1) == 0
    assert data_parallel.ring_allreduce_bytes(1000, 2) == 1000
    assert data_parallel.ring_allreduce_bytes(1000, 4) == 1500


def test_averaged_gradients_are_the_gradient_of_the_union_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    grads = []
    for part in (slice(0, 4), slice(4, 8)):
        model.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        grads.append(model.weight.grad.clone())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(data_parallel.average_gradients(grads), model.weight.grad)


# ---------------------------------------------------------------------- graphs


@pytest.mark.parametrize(
    "kind,n,degree",
    [("ring", 5, 2), ("ring", 2, 1), ("torus", 9, 4), ("torus", 16, 4), ("random_regular", 8, 3), ("complete", 5, 4)],
)
def test_base_graphs_are_simple_and_regular(kind, n, degree):
    edges = gossip.base_graph(kind, n, degree=3, seed=1)
    assert len(set(edges)) == len(edges) and all(i < j for i, j in edges)
    adjacency = gossip.neighbours(edges, n)
    assert [len(a) for a in adjacency] == [degree] * n


def test_random_regular_graph_follows_its_seed_and_refuses_impossible_sizes():
    assert gossip.base_graph("random_regular", 10, 3, seed=4) == gossip.base_graph("random_regular", 10, 3, seed=4)
    with pytest.raises(ValueError, match="n·degree even"):
        gossip.base_graph("random_regular", 5, 3)
    with pytest.raises(ValueError, match="choose one of"):
        gossip.base_graph("star", 5)


@pytest.mark.parametrize("kind,n", [("ring", 6), ("ring", 7), ("torus", 9), ("random_regular", 10), ("complete", 6)])
def test_matchings_split_the_graph(kind, n):
    edges = gossip.base_graph(kind, n, degree=3)
    parts = gossip.matchings(edges)
    assert sorted(itertools.chain(*parts)) == edges  # every edge exactly once
    for part in parts:
        nodes = [v for e in part for v in e]
        assert len(nodes) == len(set(nodes))  # a matching: nobody twice
    rounds = [gossip.active_edges(r, edges, "matchings") for r in range(len(parts) + 1)]
    assert rounds[0] == parts[0] and rounds[len(parts)] == parts[0]  # rotation cycles
    assert gossip.active_edges(3, edges, "none") == edges


def test_dpsgd_mixing_by_hand():
    adjacency = gossip.neighbours(gossip.base_graph("ring", 4), 4)  # 0-1-2-3-0
    alpha = gossip.gossip_alpha(adjacency)
    assert alpha == pytest.approx(1 / 3)
    weights = gossip.mixing_weights(0, adjacency, [1.0] * 4, alpha)
    assert weights == pytest.approx({0: 1 / 3, 1: 1 / 3, 3: 1 / 3})
    xs = [t(float(i)) for i in range(4)]
    gossip.gossip_round(xs, adjacency, [1.0] * 4)
    torch.testing.assert_close(torch.cat(xs), t((0 + 1 + 3) / 3, (1 + 0 + 2) / 3, (2 + 1 + 3) / 3, (3 + 2 + 0) / 3))


def test_aldsgd_corrections_by_hand():
    # a path 0 - 1 - 2 plus 1 - 3: worker 1 has degree 3; from worker 0's side the neighbours are {1}
    adjacency = [[1], [0, 2, 3], [1], [1]]
    losses = [0.5, 0.9, 0.1, 0.7]
    alpha = 0.25
    c1, c2, p1, p2 = 0.3, 0.1, 0.2, 0.2
    # worker 2: neighbours {1}; best among {2, 1} is 2 itself, max degree is 1
    w = gossip.mixing_weights(2, adjacency, losses, alpha, c1, c2, p1, p2)
    y = {2: 1 - alpha, 1: alpha}  # gossip
    y = {k: v * (1 - c1 - c2) for k, v in y.items()}
    y[2] += c1
    y[1] += c2  # y ← (1 − c1 − c2)y + c1·x_best + c2·x_maxdeg
    y = {k: v * (1 - p1 - p2) for k, v in y.items()}
    y[2] += p1
    y[1] += p2  # y ← y − p1(y − x_best) − p2(y − x_maxdeg)
    assert w == pytest.approx(y)
    assert sum(w.values()) == pytest.approx(1.0)
    # worker 1: best neighbour is 2 (loss 0.1), max degree is itself
    w1 = gossip.mixing_weights(1, adjacency, losses, alpha, c1, c2, p1, p2)
    assert max(w1, key=w1.get) in (1, 2) and w1[2] > w1[0] and w1[2] > w1[3]


def test_aldsgd_with_zero_coefficients_is_dpsgd_and_nan_never_leads():
    adjacency = gossip.neighbours(gossip.base_graph("ring", 5), 5)
    losses = [0.3, float("nan"), 0.2, 0.9, 0.1]
    for i in range(5):
        assert gossip.mixing_weights(i, adjacency, losses, 1 / 3, 0, 0, 0, 0) == gossip.mixing_weights(
            i, adjacency, losses, 1 / 3
        )
    w = gossip.mixing_weights(0, adjacency, losses, 1 / 3, c1=0.5, c2=0.0, p1=0.0, p2=0.0)
    assert w[4] > w[1]  # the best finite neighbour (4) gets the corrective weight, not the NaN one


def test_mix_in_place():
    x = t(1.0, 2.0)
    gossip.mix_(x, 0.5, [t(3.0, 0.0), t(1.0, 1.0)], [0.25, 0.25])
    torch.testing.assert_close(x, t(0.5 + 0.75 + 0.25, 1.0 + 0.0 + 0.25))


def test_a_gossip_round_goes_on_without_the_weights_lost_with_a_local_leader():
    """The coordinator's bookkeeping (no Ray): a neighbour keeps the share of a lost input as its
    own weight, and a re-formed group's new workers start from the mean of what survives."""
    from lsgd_ray import TrainConfig
    from lsgd_ray._internal.peer_gossip import Gossip
    from lsgd_ray.topology import GroupPlan

    plans = [GroupPlan(group=g, node_id="n", num_workers=2, first_rank=2 * g) for g in range(2)]
    config = TrainConfig(algorithm="dpsgd", num_groups=2, workers_per_group=2, max_steps=8)
    coordinator = Gossip([None, None], plans, config, 10.0)
    coordinator.setup()
    coordinator.pending_from = [[1, 2], [0, 3], [0, 3], [1, 2]]
    coordinator.published = ["w0", "w1", "w2", "w3"]
    coordinator._group_lost(1)  # ranks 2 and 3: their published weights died with their LocalLeader
    steps, own, shares, *refs = coordinator._without_lost_inputs(0, (4, 0.4, [0.25, 0.35], "w1", "w2"))
    assert (steps, shares, refs) == (4, [0.25], ["w1"]) and own == pytest.approx(0.75)
    assert coordinator._without_lost_inputs(1, (4, 1.0, [])) is None  # not this round's mix: replace it
    source, args, origin = coordinator._replacement(2, (4, 0.5, [0.5], "w1"))
    assert args == (4, 0.0, [0.5, 0.5], "w0", "w1") and origin == "the mean of the other workers' weights"
