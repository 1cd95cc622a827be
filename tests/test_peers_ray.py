"""Every peer algorithm on one local Ray: it trains, its bytes match theory, and its degenerate
settings reproduce the simpler algorithm they reduce to."""

import functools
import json

import pytest
import ray
import torch

from lsgd_ray import (
    ConfigError,
    DataParallelConfig,
    DiLoCoConfig,
    EASGDConfig,
    GossipConfig,
    LocalSGDConfig,
    LSGDConfig,
    OptimizerConfig,
    TrainConfig,
    Trainer,
)
from lsgd_ray.algorithms import data_parallel, diloco, gossip
from lsgd_ray.algorithms.communication import expected_bytes
from lsgd_ray.algorithms.lsgd import sync_round
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp
from tests.helpers import StepLoop, big_batch_loop, loaded, plain_loop, torch_loaded

MODEL = functools.partial(mlp, (16,), 4, hidden=32)
DATA = functools.partial(synthetic, n_train=1024, n_test=512)
PLAIN_SGD = OptimizerConfig(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)
S = sum(p.numel() for p in MODEL().parameters()) * 4  # bytes of flat weights (the MLP has no buffers)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def config(tmp_path, algorithm, **kw):
    defaults = dict(num_groups=2, workers_per_group=2, batch_size=32, eval_every_s=1.0, quiet=True)
    defaults.update(kw)
    return TrainConfig(algorithm=algorithm, output_dir=str(tmp_path / algorithm), **defaults)


# What each worker receives per step, in theory, for 2 groups x 2 workers with the defaults
# (τ=4, τ_G=16; gossip τ=1 over one matching of a 4-ring per round: degree 1), by hand; the
# library's own table (lsgd_ray.algorithms.communication) must agree.
RECEIVED = {
    "lsgd": S / 4 * (1 / 2) + S / 16 * (3 / 4),  # leaders skip their own pull: 1 of 2, then 3 of 4 receive
    "data_parallel": 2 * S * 3 / 4,  # ring all-reduce of the gradient every step
    "local_sgd": S * (1 / 4 - 1 / 16) + 2 * S * 3 / 4 / 16,  # ring of 2 (moves S) at 4, 8, 12; ring of 4 at 16
    "easgd": S / 4,
    "easgd_async": S / 4,
    "downpour": S / 4,
    "dpsgd": S * 1,
    "aldsgd": S * 1,
    "diloco": 2 * S * 3 / 4 / 16,  # a ring all-reduce of the weights over 4 every H = 16 steps
    "lsgd_bf16": (S / 4 * (1 / 2) + S / 16 * (3 / 4)) / 2,  # the leaders' weights travel as bfloat16
    "data_parallel_bf16": 2 * S * 3 / 4 / 2,  # torch's bf16_compress_hook: the gradient in half the bytes
    # comm_dtype bfloat16: half of each (local SGD's anchor checksums add 24-36 bytes per average: ~2% here)
    "local_sgd_bf16": (S * (1 / 4 - 1 / 16) + 2 * S * 3 / 4 / 16) / 2,
    "easgd_bf16": S / 4 / 2,
    "diloco_bf16": 2 * S * 3 / 4 / 16 / 2,
}
VARIANTS = {  # name: (algorithm, settings)
    "easgd_async": ("easgd", {"easgd": EASGDConfig(mode="async")}),
    "lsgd_bf16": ("lsgd", {"comm_dtype": "bfloat16"}),
    "data_parallel_bf16": ("data_parallel", {"data_parallel": DataParallelConfig(compression="bf16")}),
    "local_sgd_bf16": ("local_sgd", {"comm_dtype": "bfloat16"}),
    "easgd_bf16": ("easgd", {"comm_dtype": "bfloat16"}),
    "diloco_bf16": ("diloco", {"comm_dtype": "bfloat16"}),
}


def test_hand_theory_agrees_with_the_library_table():
    for name, value in RECEIVED.items():
        algorithm, extra = VARIANTS.get(name, (name, {}))
        cfg = TrainConfig(algorithm=algorithm, epochs=1, **extra)
        assert expected_bytes(cfg, S, [2, 2])["received"] == pytest.approx(value), name


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(RECEIVED))
def test_trains_and_moves_the_bytes_theory_says(tmp_path, name):
    algorithm, extra = VARIANTS.get(name, (name, {}))
    cfg = config(tmp_path, algorithm, epochs=8, lsgd=LSGDConfig(tau=4, tau_global=16), **extra)
    with Trainer(MODEL, DATA, cfg) as trainer:
        result = trainer.fit()
        # start-up: only the Workers import torch, and none torch._dynamo
        # (the Workers' SGD is lsgd_ray's own); the coordinators and LocalLeaders neither
        leaders = [trainer.global_leader, *trainer.local_leaders]
        assert [torch_loaded(a) for a in leaders] == [False] * 3
        assert not any(loaded(a, "torch._dynamo") for a in trainer.workers)
    assert result.status == "completed" and result.algorithm == algorithm
    assert result.final_test_accuracy > 0.7, result.history  # 4 classes: chance is 0.25
    saved = json.loads((tmp_path / algorithm / "result.json").read_text())
    comm = saved["communication"]
    assert comm["weight_bytes"] == S and len(comm["per_worker"]) == 4
    assert comm["bytes_received_per_worker_step"] == pytest.approx(RECEIVED[name], rel=0.05)
    for row in comm["per_worker"]:
        if algorithm != "lsgd":  # under LSGD a worker that often leads receives less
            assert row["bytes_received_per_step"] == pytest.approx(RECEIVED[name], rel=0.05)
    if algorithm in ("data_parallel", "local_sgd", "easgd"):  # symmetric exchanges (+ 8-byte estimates)
        assert comm["bytes_sent_per_worker_step"] == pytest.approx(RECEIVED[name], rel=0.05)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / algorithm / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"leader/test_accuracy", "comm/bytes_received_per_worker_step", "worker/3/bytes_sent_per_step"} <= tags
    assert {"leader/rank", "leader_by_time/test_error", "worker/0/loss_estimate", "comm/pulls"} <= tags
    counted = events.Scalars("comm/pulls" if algorithm == "lsgd" else "comm/exchanges")
    assert counted[-1].value > 0 and [e.value for e in counted] == sorted(e.value for e in counted)


def _weights(tmp_path, algorithm, steps, groups=2, per_group=2, **kw):
    cfg = config(tmp_path, algorithm, num_groups=groups, workers_per_group=per_group, max_steps=steps, **kw)
    with Trainer(MODEL, DATA, cfg) as trainer:
        status = trainer.run_rounds()
        weights = [torch.from_numpy(w.copy()) for w in trainer.worker_weights()]
        assert all(s["steps"] == steps for s in trainer.worker_stats())
    return cfg, status, weights


@pytest.mark.timeout(180)
def test_data_parallel_equals_one_process_with_the_union_batch_and_local_sgd_tau_1(tmp_path):
    cfg, _, dp = _weights(tmp_path, "data_parallel", 20, optimizer=PLAIN_SGD)
    expected = big_batch_loop(4, 20, cfg, MODEL, DATA)  # batch 4·32
    for rank, w in enumerate(dp):
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-5, msg=f"worker {rank}")
    one = LocalSGDConfig(tau=1, tau_global=1)
    _, _, local = _weights(tmp_path, "local_sgd", 20, optimizer=PLAIN_SGD, local_sgd=one)
    for rank, w in enumerate(local):
        torch.testing.assert_close(w, dp[rank], rtol=0, atol=1e-5, msg=f"worker {rank}")
    # PowerSGD with a rank at least every gradient's and no error feedback: nothing is worth
    # compressing, torch's hook all-reduces every gradient whole: data-parallel to float rounding
    whole = DataParallelConfig(compression="powersgd", powersgd_rank=64, powersgd_start=0, error_feedback=False,
                               warm_start=False)  # fmt: skip
    _, _, psgd = _weights(tmp_path / "psgd", "data_parallel", 20, optimizer=PLAIN_SGD, data_parallel=whole)
    for rank, w in enumerate(psgd):
        torch.testing.assert_close(w, dp[rank], rtol=0, atol=1e-6, msg=f"worker {rank}")


@pytest.mark.timeout(180)
def test_powersgd_rank_1_trains_and_moves_what_its_low_rank_factors_weigh(tmp_path):
    """64 steps: 10 plain all-reduces, then P and Q of each weight matrix (biases whole)."""
    cfg = config(
        tmp_path, "data_parallel", epochs=8, data_parallel=DataParallelConfig(compression="powersgd", powersgd_rank=1)
    )
    with Trainer(MODEL, DATA, cfg) as trainer:
        result = trainer.fit()
    assert result.status == "completed" and result.final_test_accuracy > 0.7, result.history
    steps = result.steps_per_worker
    shapes = [tuple(p.shape) for p in MODEL().parameters()]
    compressed = 4 * data_parallel.powersgd_elements(shapes, 1)
    expected = (10 * 2 * S * 3 / 4 + (steps - 10) * 2 * compressed * 3 / 4) / steps
    assert compressed < S / 4
    comm = result.communication
    assert comm["bytes_received_per_worker_step"] == pytest.approx(expected, rel=0.05)
    saved = json.loads((tmp_path / "data_parallel" / "result.json").read_text())
    assert saved["config"]["data_parallel"]["compression"] == "powersgd"


@pytest.mark.timeout(180)
def test_easgd_with_alpha_zero_is_independent_sgd(tmp_path):
    cfg, _, weights = _weights(tmp_path, "easgd", 12, easgd=EASGDConfig(alpha=0.0, tau=4))
    for rank, w in enumerate(weights):
        expected, _ = plain_loop(rank, 4, 12, cfg, MODEL, DATA)
        assert torch.equal(w, expected), f"worker {rank} differs"


@pytest.mark.timeout(180)
def test_easgd_rounds_match_the_equations(tmp_path):
    """Two synchronous rounds of 4 steps, each ending in the elastic exchange, against the rule
    computed in one process; the evaluated model is the center."""
    cfg = config(tmp_path, "easgd", max_steps=8, optimizer=PLAIN_SGD, easgd=EASGDConfig(tau=4, beta=0.8))
    with Trainer(MODEL, DATA, cfg) as trainer:
        trainer.run_rounds()
        got = [torch.from_numpy(w.copy()) for w in trainer.worker_weights()]
        center_got = torch.from_numpy(ray.get(trainer.leader_weights_ref()).copy())
    alpha = 0.8 / 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loops = [StepLoop(r, 4, cfg, MODEL, DATA) for r in range(4)]
    center = loops[0].flat()
    for _ in range(2):
        for loop in loops:
            for _ in range(4):
                loop.step()
        xs = [loop.flat() for loop in loops]
        diffs = [x - center for x in xs]  # x − x̃, both from before the exchange
        for loop in loops:
            loop.lerp_(center, alpha)  # x ← x − α(x − x̃)
        center = center + alpha * sum(diffs)  # x̃ ← x̃ + α Σ (x_i − x̃)
    torch.set_num_threads(threads)
    for rank in range(4):
        torch.testing.assert_close(got[rank], loops[rank].flat(), rtol=0, atol=2e-6, msg=f"worker {rank}")
    torch.testing.assert_close(center_got, center, rtol=0, atol=2e-6)


@pytest.mark.timeout(240)
def test_aldsgd_with_zero_coefficients_equals_dpsgd_and_matches_the_reference_round(tmp_path):
    zero = GossipConfig(c1=0.0, c2=0.0, p1=0.0, p2=0.0, tau=2)
    _, _, al = _weights(tmp_path, "aldsgd", 10, gossip=zero)
    _, _, dp = _weights(tmp_path, "dpsgd", 10, gossip=GossipConfig(tau=2))
    for rank in range(4):
        assert torch.equal(al[rank], dp[rank]), f"worker {rank}"
    # one AL-DSGD round with the reference coefficients against the single-process rule
    cfg, _, got = _weights(tmp_path / "one", "aldsgd", 3, gossip=GossipConfig(tau=3, rotation="none"))
    xs, losses = [], []
    for rank in range(4):
        x, batch_losses = plain_loop(rank, 4, 3, cfg, MODEL, DATA)
        xs.append(x)
        losses.append(sum(batch_losses) / len(batch_losses))
    adjacency = gossip.neighbours(gossip.base_graph("ring", 4), 4)
    gossip.gossip_round(xs, adjacency, losses, c1=0.3, c2=0.1, p1=0.2, p2=0.2)
    for rank in range(4):
        torch.testing.assert_close(got[rank], xs[rank], rtol=0, atol=2e-6)


@pytest.mark.timeout(240)
def test_hierarchical_diloco_with_outer_sgd_lr_1_and_no_momentum_is_local_sgd(tmp_path):
    """Group averages every 2 steps, the outer step every 8: with lr 1 and no momentum the
    global weights are the plain average, so every worker is where local SGD puts it."""
    plain_outer = OptimizerConfig(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0)
    hierarchical = DiLoCoConfig(tau=2, tau_global=8, outer=plain_outer)
    _, _, dl = _weights(tmp_path, "diloco", 20, optimizer=PLAIN_SGD, diloco=hierarchical)
    _, _, ls = _weights(tmp_path, "local_sgd", 20, optimizer=PLAIN_SGD, local_sgd=LocalSGDConfig(tau=2, tau_global=8))
    for rank in range(4):
        torch.testing.assert_close(dl[rank], ls[rank], rtol=0, atol=1e-5, msg=f"worker {rank}")
    assert not torch.equal(dl[0], dl[2])  # step 18 averaged each group, 20 is past it: groups differ


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "algorithm, settings",
    [
        ("local_sgd", {"local_sgd": LocalSGDConfig(tau=4, tau_global=16)}),
        ("diloco", {"diloco": DiLoCoConfig(tau=2, tau_global=8)}),
        ("diloco", {"diloco": DiLoCoConfig(tau_global=8, fragments=2)}),
    ],
    ids=["local_sgd", "hierarchical_diloco", "streaming_diloco"],
)
def test_bfloat16_exchanges_keep_workers_equal_and_stay_close_to_float32(tmp_path, algorithm, settings):
    """16 steps, ending on a global exchange: every worker holds the same weights, bit for bit,
    and they are where the float32 run put them, give or take bfloat16's rounding of what moved."""
    _, _, half = _weights(tmp_path / "bf16", algorithm, 16, comm_dtype="bfloat16", **settings)
    _, _, full = _weights(tmp_path / "f32", algorithm, 16, **settings)
    # streaming: the step-16 exchange was fragment 1's (fragment 0's was at 12)
    fragments = settings["diloco"].fragments if algorithm == "diloco" else 1
    start, end = diloco.fragment_bounds(half[0].numel(), fragments)[-1] if fragments > 1 else (0, half[0].numel())
    assert all(torch.equal(half[0][start:end], w[start:end]) for w in half[1:])
    # bfloat16 keeps 8 significant bits (relative error <= 2^-9 on each value that moves); DiLoCo's
    # outer Nesterov step (lr 0.7, momentum 0.9) scales a rounding by up to 1.33 and the momentum
    # carries it into the next round, and training in between adds its own drift: measured, the
    # largest difference was 1.6e-3 (local SGD) and 3.2e-3 (DiLoCo), the mean about 1e-4
    for rank in range(4):
        difference = (half[rank] - full[rank]).abs()
        assert difference.max() < 5e-3 and difference.mean() < 2e-4, (rank, difference.max(), difference.mean())
    assert not torch.equal(half[0], full[0])


@pytest.mark.timeout(180)
def test_lsgd_on_one_group_is_the_single_leader_rule(tmp_path):
    lsgd = LSGDConfig(lam=0.3, lam_global=0.25, tau=2, tau_global=4)
    cfg, status, got = _weights(tmp_path, "lsgd", 4, groups=1, per_group=4, optimizer=PLAIN_SGD, lsgd=lsgd)
    xs, losses = [], []
    for rank in range(4):
        x, batch_losses = plain_loop(rank, 4, 4, cfg, MODEL, DATA)
        xs.append(x)
        losses.append(sum(batch_losses) / len(batch_losses))
    # single leader: x ← x − λ_G (x − x̃), the local pull (λ) never acts
    _, (_, leader) = sync_round([xs], [losses], 0.3, 0.25, local=False, global_=True)
    assert status["leader"] == leader and status["local_pulls"] == 0
    for rank in range(4):
        torch.testing.assert_close(got[rank], xs[rank], rtol=0, atol=2e-6)


@pytest.mark.timeout(180)
def test_lsgd_proximal_pull_follows_the_rule_step_by_step(tmp_path):
    """One group of 2, plain SGD: after every step each worker moves p/τ_G of the way toward its
    stored leader: the initial weights until the pull at step 4, then that leader's snapshot,
    which the leader itself stores too."""
    lsgd = LSGDConfig(lam=0.0, lam_global=0.2, tau=2, tau_global=4, proximal=0.5, loss_window=4)
    cfg, status, got = _weights(tmp_path, "lsgd", 8, groups=1, per_group=2, optimizer=PLAIN_SGD, lsgd=lsgd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loops = [StepLoop(r, 2, cfg, MODEL, DATA) for r in range(2)]
    target = loops[0].flat()  # the same initial weights on every worker
    for step in range(1, 9):
        for loop in loops:
            loop.step()
            loop.lerp_(target, 0.5 / 4)
        if step % 4 == 0:
            means = [sum(loop.losses[-4:]) / 4 for loop in loops]
            leader = min(range(2), key=lambda r: means[r])
            target = loops[leader].flat()
            loops[1 - leader].lerp_(target, 0.2)
    torch.set_num_threads(threads)
    assert status["leader"] == leader
    for rank in range(2):
        torch.testing.assert_close(got[rank], loops[rank].flat(), rtol=0, atol=2e-6, msg=f"worker {rank}")


@pytest.mark.timeout(60)
def test_impossible_gossip_graph_is_refused_before_any_actor(tmp_path):
    cfg = config(tmp_path, "aldsgd", epochs=1, gossip=GossipConfig(graph="random_regular", degree=5))
    with pytest.raises(ConfigError, match="gossip graph for 4 workers: a 5-regular graph on 4 nodes"):
        Trainer(MODEL, DATA, cfg).start()


@pytest.mark.timeout(120)
def test_downpour_with_one_worker_is_plain_sgd(tmp_path):
    """Pushing every change and fetching the server's sum of them gives back the worker's own
    trajectory (to float rounding): the transport loses and duplicates nothing."""
    cfg = config(tmp_path, "downpour", num_groups=1, workers_per_group=1, max_steps=12, eval_every_s=30.0)
    with Trainer(MODEL, DATA, cfg) as trainer:
        result = trainer.fit()
        weights = torch.from_numpy(trainer.worker_weights()[0].copy())
        server = torch.from_numpy(ray.get(trainer.leader_weights_ref()).copy())
    assert result.steps_per_worker == 12
    expected, _ = plain_loop(0, 1, 12, cfg, MODEL, DATA)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(server, expected, rtol=0, atol=1e-6)
