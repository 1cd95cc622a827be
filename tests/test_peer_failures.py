"""Failures injected into the peers' runs: a worker SIGKILLed mid-run is replaced on its node
from the weights its algorithm defines and the run completes; for data-parallel and local SGD
the workers' torch.distributed group is re-formed with the new process. A LocalLeader killed is
replaced with its workers; the coordinator killed is restarted from the last checkpoint."""

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle
from ray.exceptions import OwnerDiedError

from lsgd_ray import (
    DataParallelConfig,
    DiLoCoConfig,
    EASGDConfig,
    LocalSGDConfig,
    OptimizerConfig,
    TrainConfig,
    Trainer,
)
from lsgd_ray._internal.peer_groups import PeerGroups
from lsgd_ray._internal.worker import Worker
from tests.helpers import kill_if_alive, once_checkpointed, stopped
from tests.test_failures import DATA, MODEL, dead, pids, strike

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get this module's classes


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def killed_at(rank, step, flag):
    """A Worker class whose process ``rank`` SIGKILLs itself right after its step ``step``,
    once per run (``flag``, a file, tells the replacement not to do it again)."""

    class KilledAt(Worker):
        def _step(self):
            super()._step()
            if self.rank == rank and self.steps == step and not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    return KilledAt


def killed_at_each_time(rank, step, flag, times):
    """``killed_at``, ``times`` times in a row: the process ``rank`` and each of its next
    replacements SIGKILL themselves right after step ``step`` (files ``flag.0``, ``flag.1``...
    count them)."""

    class KilledEachTime(Worker):
        def _step(self):
            super()._step()
            done = sum(os.path.exists(f"{flag}.{k}") for k in range(times))
            if self.rank == rank and self.steps == step and done < times:
                open(f"{flag}.{done}", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    return KilledEachTime


def config(tmp_path, algorithm, **kw):
    defaults = dict(
        algorithm=algorithm,
        num_groups=1,  # few processes: start-up dominates these tests on a small machine
        workers_per_group=2,
        batch_size=16,
        max_steps=96,
        eval_every_s=1000.0,
        optimizer=OptimizerConfig(lr=0.05),
        actor_timeout_s=10.0,  # also the gloo timeout: a survivor stuck in a collective waits it out
        quiet=True,
    )
    defaults.update(kw)
    return TrainConfig(output_dir=str(tmp_path / algorithm), **defaults)


def run_with_a_kill(tmp_path, cfg, rank=1, step=37):
    """Train with worker ``rank`` killed after its step ``step``; the result, the killed pid
    and node, the new worker's ``ready()`` and every worker's final weights."""
    cls = killed_at(rank, step, str(tmp_path / "killed"))
    with Trainer(MODEL, DATA, cfg, worker_cls=cls) as trainer:
        old_pid, node = pids(trainer)[rank]
        result = trainer.fit()
        new = ray.get(trainer.workers[rank].ready.remote())
        weights = trainer.worker_weights()
    return result, old_pid, node, new, weights


def check_replaced(result, old_pid, node, new, origin, rank=1, max_steps=96):
    assert result.status == "completed", result.error
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [e["rank"] for e in replaced] == [rank], result.events
    assert "died" in replaced[0]["reason"] and replaced[0]["from"] == origin
    assert new["pid"] != old_pid and new["pid"] == replaced[0]["pid"] and new["node_id"] == node
    assert result.steps_per_worker == max_steps
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy  # chance is 0.25


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "algorithm, origin", [("easgd", "the center"), ("aldsgd", "the mean of the other workers' weights")]
)
def test_a_killed_worker_of_an_object_store_peer_is_replaced(tmp_path, algorithm, origin):
    cfg = config(tmp_path, algorithm, workers_per_group=3 if algorithm == "aldsgd" else 2)
    result, old_pid, node, new, weights = run_with_a_kill(tmp_path, cfg)
    check_replaced(result, old_pid, node, new, origin)
    assert all(np.isfinite(w).all() for w in weights)
    with open(os.path.join(result.output_dir, "result.json")) as f:
        assert '"worker_replaced"' in f.read()


@pytest.mark.timeout(240)
def test_data_parallel_re_forms_its_group_and_its_workers_stay_equal(tmp_path):
    cfg = config(tmp_path, "data_parallel")
    result, old_pid, node, new, weights = run_with_a_kill(tmp_path, cfg, rank=1, step=21)
    check_replaced(result, old_pid, node, new, "worker 0's weights and optimizer state")
    for w in weights[1:]:  # one gradient all-reduce per step again: the group really re-formed
        np.testing.assert_array_equal(w, weights[0])


def gradients_logged(flag, log):
    """``killed_at(1, 100, flag)``, each worker appending the norm of the gradient it applied at
    each step to ``log.<rank>``."""

    class GradientsLogged(killed_at(1, 100, flag)):
        def _after_backward(self):
            super()._after_backward()
            with open(f"{log}.{self.rank}", "a") as f:
                f.write(f"{self.steps + 1} {float(self.state.grad.norm())}\n")

    return GradientsLogged


@pytest.mark.timeout(240)
def test_a_powersgd_group_re_formed_starts_its_error_feedback_afresh(tmp_path):
    """Each worker's PowerSGD error feedback is its own residual, and the residuals largely
    cancel in the mean. A replica given a survivor's had it applied whole at the next step: here
    a gradient 30x the largest of the 21 before it; a chaos run went to chance."""
    cfg = config(tmp_path, "data_parallel", max_steps=130,
                 data_parallel=DataParallelConfig(compression="powersgd", powersgd_start=4))  # fmt: skip
    log = str(tmp_path / "grad")
    with Trainer(MODEL, DATA, cfg, worker_cls=gradients_logged(str(tmp_path / "killed"), log)) as trainer:
        result = trainer.fit()
        weights = trainer.worker_weights()
    assert result.status == "completed", result.error
    assert [e["rank"] for e in result.events if e["event"] == "worker_replaced"] == [1], result.events
    np.testing.assert_array_equal(weights[0], weights[1])
    norms = {}
    for line in Path(log + ".0").read_text().split("\n")[:-1]:
        step, norm = line.split()
        norms[int(step)] = float(norm)  # a step done again after the re-form: its last norm
    before = max(norms[s] for s in range(80, 101))
    assert max(norms[s] for s in range(101, 111)) < 5 * before, (before, [norms[s] for s in range(101, 111)])


def slow_to_join_once(flag, delay_s):
    """``killed_at(1, 21, flag)``, and worker 0's first ``setup_collective`` after the kill
    takes ``delay_s`` and returns without joining (once per run: ``flag.slow``): the group's
    set-up times out with no worker lost, and worker 1's join fails on its own (no store)."""

    class SlowToJoin(killed_at(1, 21, flag)):
        def setup_collective(self, *args):
            if self.rank == 0 and os.path.exists(flag) and not os.path.exists(flag + ".slow"):
                open(flag + ".slow", "w").close()
                time.sleep(delay_s)
                return None
            return super().setup_collective(*args)

    return SlowToJoin


@pytest.mark.timeout(240)
def test_a_collective_set_up_that_times_out_with_no_worker_lost_is_tried_again(tmp_path):
    """A DiLoCo chaos run's abort: on a busy machine the group's set-up after a re-formation
    timed out, no actor was lost, and the run ended. It is tried again once every worker's
    join has ended; worker 1's failed join must not leave torch's group-name counter advanced,
    or every later try's handshake times out (the retry alone failed all three tries)."""
    flag = str(tmp_path / "killed")
    cfg = config(tmp_path, "data_parallel", actor_timeout_s=10.0)
    with Trainer(MODEL, DATA, cfg, worker_cls=slow_to_join_once(flag, 12.0)) as trainer:
        result = trainer.fit()
        weights = trainer.worker_weights()
    assert os.path.exists(flag + ".slow"), "worker 0 was never slow to join"
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert [e["rank"] for e in result.events if e["event"] == "worker_replaced"] == [1], result.events
    np.testing.assert_array_equal(weights[1], weights[0])  # the group that formed at last works


@pytest.mark.timeout(240)
def test_a_killed_diloco_worker_is_replaced_from_the_global_weights_and_outer_state(tmp_path):
    """Killed after step 30, between outer steps (every 16): the new worker starts from the
    global weights and a copy of the outer optimizer; at step 96, an outer step, every worker
    holds the same global weights again (a fresh outer momentum would not give them)."""
    cfg = config(tmp_path, "diloco", num_groups=2, diloco=DiLoCoConfig(tau_global=16))
    result, old_pid, node, new, weights = run_with_a_kill(tmp_path, cfg, rank=3, step=30)
    check_replaced(result, old_pid, node, new, "the global weights", rank=3)
    for w in weights[1:]:
        np.testing.assert_array_equal(w, weights[0])


def test_a_new_local_leader_pinned_to_a_node_just_lost_is_placed_again(tmp_path):
    """A DiLoCo chaos run's abort: a group's node was removed but still listed alive, and the
    group's new LocalLeader, pinned there, was refused by Ray (``ActorUnschedulableError``,
    not an actor's death, so no second try). It is placed again once the cluster knows: here
    ``placed`` names a node that never existed, then the live one."""
    with Trainer(MODEL, DATA, config(tmp_path, "easgd")) as trainer:
        factory, (plan,) = trainer._make_local_leader, trainer.topology.groups
        answers = iter([dataclasses.replace(plan, node_id="ab" * 28), plan])

        class StillListsTheLostNode:
            def __call__(self, target, checkpoint=None):
                return factory(target, checkpoint)

            def placed(self, lost, plans):
                return next(answers)

        said = []
        coordinator = SimpleNamespace(
            make_local_leader=StillListsTheLostNode(), plans=[plan], last_checkpoint=None,
            deadlines=trainer.deadlines, log=SimpleNamespace(warning=said.append),
        )  # fmt: skip
        leader, target = PeerGroups._new_local_leader(coordinator, 0, plan, "its LocalLeader died")
        try:
            assert target == plan and ray.get(leader.ready.remote(), timeout=60) is not None
        finally:
            ray.kill(leader)
    assert said == ["new LocalLeader 0 was lost before it was ready (ActorUnschedulableError): again"], said


def replacement_starts_from_its_initial_weights(rank, step, flag):
    """``killed_at(rank, step, flag)``, and the replacement ignores the weights its LocalLeader
    hands it (as when they were lost with their owner and it fell back on the initial weights);
    at its first round it records in ``flag + ".first"`` whether its weights were the global
    weights then."""

    class StartsFromItsInitialWeights(killed_at(rank, step, flag)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.replacement = os.path.exists(flag)
            self.handed = False

        def reset_to(self, weights, steps=None):
            if self.replacement and not self.handed:
                self.handed, weights = True, None
            return super().reset_to(weights, steps)

        def train(self, *args, **kwargs):
            if self.replacement and not os.path.exists(flag + ".first"):
                same = torch.equal(self.state.flat, torch.from_numpy(self.global_weights()))
                Path(flag + ".first").write_text(json.dumps({"same": same, "outer_steps": self._outer_steps}))
            return super().train(*args, **kwargs)

    return StartsFromItsInitialWeights


@pytest.mark.timeout(240)
def test_a_diloco_replacement_left_with_the_initial_weights_goes_on_from_the_global_weights(tmp_path):
    """A chaos run's collapse to chance (DiLoCo): a replacement's source, the global weights,
    was lost with the coordinator that owned it, and it started from the initial weights. The
    set-up gave it the others' outer state, but it trained on from the initial weights, and
    the next outer step averaged those in: with the outer Nesterov momentum the global weights
    never recovered. A worker whose outer state was stale now goes on from the global ones."""
    cfg = config(tmp_path, "diloco", num_groups=2, workers_per_group=1, diloco=DiLoCoConfig(tau_global=16))
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=replacement_starts_from_its_initial_weights(1, 30, flag)) as trainer:
        result = trainer.fit()
        held = [ray.get(w.global_weights.remote()) for w in trainer.workers]
    first = json.loads(Path(flag + ".first").read_text())
    assert first == {"same": True, "outer_steps": 1}, first  # the outer step at 16, then its round again
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    np.testing.assert_array_equal(held[1], held[0])
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def dies_when_its_global_weights_are_read(flag):
    """A Worker class whose rank 0 SIGKILLs itself the first time its global weights are read
    (``flag``, a file, tells the replacement not to do it again): as an evaluation reads them."""

    class DiesWhenRead(Worker):
        def global_weights(self):
            if self.rank == 0 and not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().global_weights()

    return DiesWhenRead


@pytest.mark.timeout(240)
def test_a_diloco_evaluation_whose_worker_0_is_lost_reads_another_workers_global_weights(tmp_path):
    """A chaos run's abort (DiLoCo): worker 0 was lost between two rounds, and each of the
    evaluation's three tries asked it again for the global weights. Every worker holds them:
    another's are evaluated, and the next round replaces worker 0."""
    cfg = config(
        tmp_path, "diloco", num_groups=2, workers_per_group=1, max_steps=160, eval_every_s=0.5,
        straggler_delay_s={0: 0.02, 1: 0.02}, diloco=DiLoCoConfig(tau_global=16),
    )  # fmt: skip
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=dies_when_its_global_weights_are_read(flag)) as trainer:
        result = trainer.fit()
        held = [ray.get(w.global_weights.remote()) for w in trainer.workers]
    assert os.path.exists(flag), "worker 0 was never read"
    assert result.status == "completed" and result.steps_per_worker == 160, result.error
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [(e["rank"], e["from"]) for e in replaced] == [(0, "the global weights")], result.events
    assert len(result.history) >= 2 and result.final_test_accuracy > 0.6, result.history
    np.testing.assert_array_equal(held[1], held[0])


def loses_its_coordinator_before_the_outer_state_copy(flag):
    """A Worker class whose first ``restart_from_global`` (a replacement's copy of the others'
    global weights and outer optimizers) SIGKILLs the coordinator (its pid in ``flag + ".pid"``)
    and returns without loading: the coordinator was lost before it copied the state."""

    class LosesTheCopy(Worker):
        def restart_from_global(self, state):
            if not os.path.exists(flag + ".copy"):
                open(flag + ".copy", "w").close()
                with open(flag + ".pid") as f:
                    os.kill(int(f.read()), signal.SIGKILL)
                return None
            return super().restart_from_global(state)

    return LosesTheCopy


@pytest.mark.timeout(240)
def test_a_diloco_replacement_whose_coordinator_was_lost_before_it_got_the_outer_state_gets_it(tmp_path):
    """A chaos run's collapse to chance (DiLoCo): a replacement's coordinator was lost before it
    copied the others' global weights and outer state to it; the new coordinator found nothing
    lost, and the replacement's global weights stayed the initial ones (with no checkpoint to
    restore). Each set-up now gives every worker whose copy differs that of the worker with the
    most outer steps."""
    cfg = config(tmp_path, "diloco", num_groups=2, workers_per_group=1, diloco=DiLoCoConfig(tau_global=16))
    flag = str(tmp_path / "killed")
    cls = type(
        "KilledThenLosesTheCopy", (killed_at(1, 30, flag), loses_its_coordinator_before_the_outer_state_copy(flag)), {}
    )
    with Trainer(MODEL, DATA, cfg, worker_cls=cls) as trainer:
        with open(flag + ".pid", "w") as f:
            f.write(str(ray.get(trainer.global_leader.__ray_call__.remote(lambda _: os.getpid()))))
        result = trainer.fit()
        held = [ray.get(w.global_weights.remote()) for w in trainer.workers]
    assert os.path.exists(flag + ".copy"), "no copy of the outer state was cut short"
    assert [e["event"] for e in result.events] == ["worker_replaced", "coordinator_restarted"], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    np.testing.assert_array_equal(held[1], held[0])  # 96 is an outer step: one set of global weights


@pytest.mark.timeout(240)
def test_local_sgd_re_forms_its_group(tmp_path):
    cfg = config(tmp_path, "local_sgd", num_groups=2, local_sgd=LocalSGDConfig(tau=4, tau_global=16))
    # killed after step 30: its group-mate blocks in the group's average at 32, a global one
    result, old_pid, node, new, weights = run_with_a_kill(tmp_path, cfg, rank=3, step=30)
    check_replaced(result, old_pid, node, new, "worker 2's weights", rank=3)  # its group-mate's
    for w in weights[1:]:  # 96 is a global averaging step: every worker ends on the same mean
        np.testing.assert_allclose(w, weights[0], rtol=0, atol=1e-6)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "algorithm, origin", [("easgd", "the center"), ("downpour", "the server's weights")], ids=["easgd", "downpour"]
)
def test_a_killed_async_worker_is_replaced_from_the_server(tmp_path, algorithm, origin):
    extra: dict = {"easgd": EASGDConfig(mode="async")} if algorithm == "easgd" else {}
    cfg = config(tmp_path, algorithm, straggler_delay_s={r: 0.03 for r in range(2)}, **extra)
    with Trainer(MODEL, DATA, cfg) as trainer:
        old_pid, node = pids(trainer)[1]
        strike(old_pid, signal.SIGKILL, after_s=1.0)
        result = trainer.fit()
        new = ray.get(trainer.workers[1].ready.remote())
    check_replaced(result, old_pid, node, new, origin)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "algorithm, mode, origin",
    [
        ("easgd", "sync", "the center"),
        ("data_parallel", "sync", "worker 0's weights"),
        ("easgd", "async", "the center"),
    ],
)
def test_a_killed_local_leader_of_a_peer_is_re_formed_on_its_node(tmp_path, algorithm, mode, origin):
    """Its worker dies with it: a new LocalLeader and worker on the node, the worker restarted
    from the algorithm's weights (data-parallel: the group re-formed, every worker a replica;
    async EASGD: its loop started again by the coordinator)."""
    extra = {"easgd": EASGDConfig(mode=mode)} if algorithm == "easgd" else {}
    delays = {0: 0.03, 1: 0.03}
    cfg = config(tmp_path, algorithm, num_groups=2, workers_per_group=1, straggler_delay_s=delays, **extra)
    with Trainer(MODEL, DATA, cfg) as trainer:
        old_pid, node = pids(trainer)[1]
        threading.Timer(1.5, ray.kill, (trainer.local_leaders[1],)).start()
        result = trainer.fit()
        new = ray.get(trainer.workers[1].ready.remote())
        weights = trainer.worker_weights()
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1], result.events
    check_replaced(result, old_pid, node, new, origin if algorithm == "easgd" else f"{origin} and optimizer state")
    if algorithm == "data_parallel":
        np.testing.assert_array_equal(weights[1], weights[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["dpsgd", "aldsgd"])
def test_a_killed_local_leader_of_a_gossip_peer_is_re_formed(tmp_path, algorithm):
    """The weights its group published die with it: its new workers start from the mean of the
    others' (not from a lost group-mate's), and a neighbour whose round read the lost weights
    mixes without them instead of being replaced."""
    delays = {r: 0.03 for r in range(4)}
    cfg = config(tmp_path, algorithm, num_groups=2, workers_per_group=2, straggler_delay_s=delays)
    with Trainer(MODEL, DATA, cfg) as trainer:
        before = {rank: pid for rank, (pid, _) in pids(trainer).items()}
        threading.Timer(1.5, ray.kill, (trainer.local_leaders[1],)).start()
        result = trainer.fit()
        after = {rank: ray.get(w.ready.remote())["pid"] for rank, w in enumerate(trainer.workers)}
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1], result.events
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert sorted(e["rank"] for e in replaced) == [2, 3], result.events  # group 1's, and no survivor
    assert {e["from"] for e in replaced} == {"the mean of the other workers' weights"}
    assert [after[r] == before[r] for r in range(4)] == [True, True, False, False]
    assert result.status == "completed" and result.steps_per_worker == 96
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def kill_the_first_two_re_formed_local_leaders(coordinator):
    """Run inside the coordinator: the new LocalLeader of each of its first two re-formed groups
    is killed as soon as the group is re-formed (as a chaos run's killer struck them), and is
    dead on return. The second re-forming is the search for lost workers' (``_find_lost``),
    after the first new one was found dead."""
    reform = coordinator._reform_group

    def reform_and_kill(g, reason):
        reform(g, reason)
        coordinator._struck = getattr(coordinator, "_struck", 0) + 1
        if coordinator._struck <= 2:
            new = coordinator.local_leaders[g]
            ray.kill(new)
            with pytest.raises(ray.exceptions.RayActorError):
                while True:
                    ray.get(new.__ray_ready__.remote())

    coordinator._reform_group = reform_and_kill


@pytest.mark.timeout(300)
def test_a_local_leader_lost_right_after_its_group_was_re_formed_is_re_formed_again(tmp_path):
    """A chaos run's abort (data-parallel): a group was re-formed, and its new LocalLeader was
    killed before the coordinator asked the LocalLeaders for their workers' handles, which
    raised. The search for lost workers is made again, and re-forms that group again."""
    cfg = config(tmp_path, "data_parallel", num_groups=2, workers_per_group=1, straggler_delay_s={0: 0.03, 1: 0.03})
    with Trainer(MODEL, DATA, cfg) as trainer:
        ray.get(trainer.global_leader.__ray_call__.remote(kill_the_first_two_re_formed_local_leaders))
        threading.Timer(1.0, ray.kill, (trainer.local_leaders[1],)).start()
        result = trainer.fit()
        struck = ray.get(trainer.global_leader.__ray_call__.remote(lambda c: getattr(c, "_struck", 0)))
    assert struck == 3, f"{struck} groups re-formed"
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1, 1, 1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["easgd", "data_parallel", "local_sgd", "downpour"])
def test_a_killed_peer_coordinator_continues_from_the_last_checkpoint(tmp_path, algorithm):
    """The workers live on; a new coordinator rolls them back to the last checkpoint (the
    collective peers: after every worker left the old torch.distributed group for a new one;
    DOWNPOUR: its workers' loops ended when the ParameterServer died with the coordinator)."""
    delays = {0: 0.03, 1: 0.03}
    cfg = config(
        tmp_path, algorithm, num_groups=2, workers_per_group=1, straggler_delay_s=delays, checkpoint_every_steps=16
    )
    with Trainer(MODEL, DATA, cfg) as trainer:
        once_checkpointed(cfg.output_dir, lambda: ray.kill(trainer.global_leader))
        result = trainer.fit()
        weights = trainer.worker_weights()
    restarts = [e for e in result.events if e["event"] == "coordinator_restarted"]
    assert len(restarts) == 1, result.events
    assert restarts[0]["from_checkpoint"], restarts
    if algorithm != "downpour":  # synchronous: checkpoints every 16 steps, between rounds
        assert restarts[0]["step"] % 16 == 0, restarts
    # the workers' steps past the checkpoint, done again: at most what was left of the run
    assert 0 <= restarts[0]["steps_lost"] <= 2 * (96 - restarts[0]["step"]), restarts
    assert result.status == "completed" and result.steps_per_worker == 96
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy
    if algorithm == "data_parallel":
        np.testing.assert_array_equal(weights[1], weights[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["diloco", "easgd"])
def test_a_worker_lost_with_the_coordinator_before_any_checkpoint_restarts_as_its_rounds_would(tmp_path, algorithm):
    """A chaos run's collapse to chance (DiLoCo): the coordinator and a worker were lost before
    the first checkpoint, and the new coordinator restarted the worker from another's local
    weights, its global weights left at the initial ones; the outer steps of workers holding
    different global weights drove the run to chance. A collective's lost member now restarts
    as in a round (DiLoCo: the global weights and outer state). And the revived worker starts
    at the run's step, not at the new coordinator's 0, which sent the run back to step 0."""
    cfg = config(
        tmp_path, algorithm, num_groups=2, workers_per_group=1, max_steps=160,
        straggler_delay_s={0: 0.02, 1: 0.02}, diloco=DiLoCoConfig(tau_global=16),
    )  # fmt: skip
    struck_at: list[int] = []
    with Trainer(MODEL, DATA, cfg) as trainer:
        victim = pids(trainer)[1][0]

        def strike_both():
            while (step := ray.get(trainer.global_leader.status.remote(), timeout=30)["step"]) < 48:
                time.sleep(0.01)
            ray.kill(trainer.global_leader)  # first, so that the new one finds the worker lost
            os.kill(victim, signal.SIGKILL)
            struck_at.append(step)

        threading.Thread(target=strike_both, daemon=True).start()
        result = trainer.fit()
        if algorithm == "diloco":
            held = [ray.get(w.global_weights.remote()) for w in trainer.workers]
    assert struck_at, "never struck"
    restarts = [e for e in result.events if e["event"] == "coordinator_restarted"]
    assert len(restarts) == 1 and restarts[0]["from_checkpoint"] is None, result.events
    assert restarts[0]["step"] >= struck_at[0], (restarts, struck_at)  # not back at 0
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [e["rank"] for e in replaced] == [1], result.events
    assert result.status == "completed" and result.steps_per_worker == 160, result.error
    if algorithm == "diloco":
        np.testing.assert_array_equal(held[1], held[0])  # every worker holds the same global weights
        assert replaced[0]["from"] == "the global weights", replaced


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["easgd", "aldsgd"])
def test_a_peer_coordinator_killed_after_it_re_formed_a_group_re_forms_it_again(tmp_path, algorithm):
    """A LocalLeader that a coordinator re-formed is owned by that coordinator and dies with it
    (a chaos run's abort: the new coordinator's set-up asked the dead LocalLeader for its
    workers). The new coordinator re-forms the group again before its set-up (AL-DSGD's
    coordinator then notes the weights lost with it); the run completes."""
    delays = {0: 0.03, 1: 0.03}
    cfg = config(
        tmp_path, algorithm, num_groups=2, workers_per_group=1, straggler_delay_s=delays, checkpoint_every_steps=16
    )
    killed_at: list[float] = []

    def kill_the_local_leader_then_its_owner(trainer):
        first = trainer.local_leaders[1]
        ray.kill(first)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the coordinator has a new LocalLeader 1
            handles = ray.get(trainer.global_leader.local_leader_handles.remote(), timeout=30)
            if handles[1]._actor_id != first._actor_id:
                killed_at.append(time.time())
                ray.kill(trainer.global_leader)
                return
            time.sleep(0.02)

    with Trainer(MODEL, DATA, cfg) as trainer:
        once_checkpointed(cfg.output_dir, lambda: kill_the_local_leader_then_its_owner(trainer))
        result = trainer.fit()
    assert killed_at, "the coordinator never re-formed group 1"
    restarts = [e for e in result.events if e["event"] == "coordinator_restarted"]
    assert len(restarts) == 1, result.events
    again = [e for e in result.events if e["event"] == "group_replaced" and e["time"] > killed_at[0]]
    assert [e["group"] for e in again] == [1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


@pytest.mark.timeout(300)
def test_the_driver_keeps_a_dead_local_leaders_workers_until_the_coordinator_re_forms_it(tmp_path):
    """The driver refreshes its handles after any new event; a LocalLeader dead at that moment
    and not re-formed yet (a chaos run's abort: an asynchronous DOWNPOUR run) leaves its workers'
    old handles in place instead of ending the run. Its coordinator re-forms it at the next round."""
    cfg = config(tmp_path, "easgd", num_groups=2, workers_per_group=1)
    with Trainer(MODEL, DATA, cfg) as trainer:
        before = list(trainer.workers)
        dead(trainer.local_leaders[1], "worker_handles")  # a call right after the kill may be answered
        trainer._refresh_handles()
        assert trainer.workers == before
        result = trainer.fit()
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert trainer.workers[1] != before[1]


def dies_at_second_close(flag):
    """A Worker class whose process rank 1 SIGKILLs itself when it leaves its collective group
    the second time (the first is the run's set-up; the second, a new coordinator's), once per
    run (``flag``, a file)."""

    class DiesAtSecondClose(Worker):
        closes = 0

        def close_collective(self):
            self.closes += 1
            if self.rank == 1 and self.closes == 2 and not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().close_collective()

    return DiesAtSecondClose


@pytest.mark.timeout(300)
def test_a_worker_lost_while_a_new_peer_coordinator_sets_up_is_replaced_and_set_up_again(tmp_path):
    """A chaos run's abort: data-parallel's new coordinator forms the collective group at its
    set-up, and a worker died meanwhile. The set-up is made again after the lost worker is
    replaced; the run completes with every replica equal."""
    cfg = config(
        tmp_path,
        "data_parallel",
        num_groups=2,
        workers_per_group=1,
        straggler_delay_s={0: 0.03, 1: 0.03},
        checkpoint_every_steps=16,
    )
    flag = tmp_path / "died"
    with Trainer(MODEL, DATA, cfg, worker_cls=dies_at_second_close(str(flag))) as trainer:
        old_pid, _ = pids(trainer)[1]
        once_checkpointed(cfg.output_dir, lambda: ray.kill(trainer.global_leader))
        result = trainer.fit()
        new = ray.get(trainer.workers[1].ready.remote())
        weights = trainer.worker_weights()
    assert flag.exists(), "worker 1 never left its group a second time"
    assert [e["event"] for e in result.events if e["event"] == "coordinator_restarted"] == ["coordinator_restarted"]
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [e["rank"] for e in replaced] == [1] and new["pid"] not in (old_pid,), result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    np.testing.assert_array_equal(weights[1], weights[0])


def kills_its_local_leader_when_reset(rank, step, flag):
    """``killed_at(rank, step)``, whose first replacement, while being reset, SIGKILLs its own
    group's LocalLeader, whose pid is in the file ``flag + ".pid"`` (a second failure amid the
    recovery from the first)."""

    class KillsItsLocalLeader(killed_at(rank, step, flag)):
        def reset_to(self, weights, steps=None):
            done = flag + ".leader"
            if steps is not None and not os.path.exists(done):
                open(done, "w").close()
                with open(flag + ".pid") as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            return super().reset_to(weights, steps)

    return KillsItsLocalLeader


@pytest.mark.timeout(300)
def test_a_local_leader_lost_while_it_replaces_a_worker_is_re_formed_and_the_round_finished(tmp_path):
    """A chaos run's abort (D-PSGD): the coordinator asked a LocalLeader to replace a lost
    worker and the LocalLeader died meanwhile. Its group is re-formed and its new worker
    restarted in turn; the run completes."""
    cfg = config(tmp_path, "easgd", num_groups=2, workers_per_group=1, straggler_delay_s={0: 0.03, 1: 0.03})
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=kills_its_local_leader_when_reset(1, 37, flag)) as trainer:
        pid = ray.get(trainer.local_leaders[1].__ray_call__.remote(lambda _: os.getpid()))
        with open(flag + ".pid", "w") as f:
            f.write(str(pid))
        result = trainer.fit()
    assert os.path.exists(flag + ".leader"), "no replacement was reset"
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def dies_giving_weights_after(flag):
    """A Worker class whose rank 0 SIGKILLs itself the first time it is asked for its weights
    (``get_weights(count=False)``) once the file ``flag`` exists."""

    class DiesGivingWeights(Worker):
        def get_weights(self, count=True):
            if self.rank == 0 and not count and os.path.exists(flag) and not os.path.exists(flag + ".done"):
                open(flag + ".done", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().get_weights(count)

    return DiesGivingWeights


# the runs with a ParameterServer: EASGD in both modes, DOWNPOUR (asynchronous only)
SERVER_RUNS = pytest.mark.parametrize(
    "algorithm, mode",
    [("easgd", "sync"), ("easgd", "async"), ("downpour", "async")],
    ids=["easgd", "easgd-async", "downpour"],
)


@pytest.mark.timeout(300)
@SERVER_RUNS
def test_a_parameter_server_killed_on_its_own_is_replaced_from_the_workers_mean(tmp_path, algorithm, mode):
    """The ParameterServer killed while its coordinator lives (out of memory, say): a new one
    starts from the workers' mean, and the workers go on with it on their own processes, from
    their own weights (none replaced). Before, every worker failed on the lost center in turn
    and the run ended ("workers keep failing", or the async loops' error)."""
    extra: dict = {"easgd": EASGDConfig(mode=mode)} if algorithm == "easgd" else {}
    cfg = config(tmp_path, algorithm, straggler_delay_s={r: 0.03 for r in range(2)}, **extra)
    with Trainer(MODEL, DATA, cfg) as trainer:
        server = ray.get(trainer.global_leader.__ray_call__.remote(lambda coordinator: coordinator.server))
        pid = ray.get(server.__ray_call__.remote(lambda _: os.getpid()))
        strike(pid, signal.SIGKILL, after_s=1.0)
        result = trainer.fit()
    (replaced,) = [e for e in result.events if e["event"] == "server_replaced"]
    assert "died" in replaced["reason"] and replaced["from"] == "the workers' mean", replaced
    assert replaced["step"] < 96, replaced  # found by the training, not only by the final evaluation
    others = [e["event"] for e in result.events if e["event"] != "server_replaced"]
    assert "worker_replaced" not in others and "coordinator_restarted" not in others, result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def exited(pid):
    """Process ``pid`` is gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.timeout(300)
@SERVER_RUNS
def test_a_hung_parameter_server_is_killed_and_replaced_from_the_workers_mean(tmp_path, algorithm, mode):
    """The ParameterServer stopped (SIGSTOP: hung, as a process stuck in a swap storm) while its
    coordinator lives: silent for longer than ``actor_timeout_s`` allows a busy one, it is
    killed and a new one starts from the workers' mean, and the run goes on. Before, a server
    that did not answer was only ever taken for a busy one and left alone; and the synchronous
    round's workers, waiting on its center, were taken for hung and replaced."""
    extra: dict = {"easgd": EASGDConfig(mode=mode)} if algorithm == "easgd" else {}
    cfg = config(tmp_path, algorithm, actor_timeout_s=5.0, straggler_delay_s={r: 0.03 for r in range(2)}, **extra)
    with Trainer(MODEL, DATA, cfg) as trainer:
        server = ray.get(trainer.global_leader.__ray_call__.remote(lambda coordinator: coordinator.server))
        pid = ray.get(server.__ray_call__.remote(lambda _: os.getpid()))
        with stopped(pid, after_s=1.0):
            result = trainer.fit()
            # Ray SIGKILLs an actor that does not take its kill (a stopped one) 5 s later
            gone = any(exited(pid) or time.sleep(0.5) for _ in range(60))
    (replaced,) = [e for e in result.events if e["event"] == "server_replaced"]
    assert "hung" in replaced["reason"] and replaced["from"] == "the workers' mean", replaced
    # the workers waiting on its center are not hung themselves (synchronous EASGD replaced them)
    assert [e["event"] for e in result.events] == ["server_replaced"], result.events
    assert gone, "the hung server was left running"
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


@pytest.mark.timeout(300)
def test_a_round_that_loses_a_worker_four_times_in_a_row_goes_on(tmp_path):
    """A D-PSGD chaos run ended with "workers keep failing in train_gossip": one round lost a
    node, a LocalLeader and a new LocalLeader in a row, and a round gave up after one pass per
    worker and one more (3 here). Worker 1 and its next three replacements die in the same
    round: it is replaced four times and the run goes on."""
    cfg = config(tmp_path, "dpsgd", num_groups=2, workers_per_group=1)
    with Trainer(MODEL, DATA, cfg, worker_cls=killed_at_each_time(1, 37, str(tmp_path / "killed"), 4)) as trainer:
        result = trainer.fit()
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [e["rank"] for e in replaced] == [1, 1, 1, 1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error


@pytest.mark.timeout(300)
def test_a_worker_that_dies_at_every_try_ends_the_run_naming_the_round(tmp_path):
    """The bound on a round's passes is still there: a worker whose every replacement dies in
    the same round (out of memory at that step, say) ends the run with a message."""
    cfg = config(tmp_path, "dpsgd", num_groups=2, workers_per_group=1)
    cls = killed_at_each_time(1, 37, str(tmp_path / "killed"), 1000)
    with (
        Trainer(MODEL, DATA, cfg, worker_cls=cls) as trainer,
        pytest.raises(RuntimeError, match="workers keep failing"),
    ):
        trainer.fit()


def slow_to_give_weights(flag):
    """A Worker class each of whose workers, once the file ``flag`` exists, takes 12 s (more
    than ``actor_timeout_s``) to answer its first ``get_weights(count=False)`` from then on."""

    class SlowToGiveWeights(Worker):
        def get_weights(self, count=True):
            marker = f"{flag}.{self.rank}"
            if not count and os.path.exists(flag) and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(12.0)
            return super().get_weights(count)

    return SlowToGiveWeights


@pytest.mark.timeout(300)
@SERVER_RUNS
def test_a_server_lost_while_no_worker_answers_starts_again_from_the_checkpoints_center(tmp_path, algorithm, mode):
    """The server lost while no worker gives its weights in time (each struck, or busy being
    replaced: EASGD's and DOWNPOUR's chaos runs ended with "no worker answered within 5s: no
    weights to average"): the new server starts from the center in the newest checkpoint."""
    flag = str(tmp_path / "slow")
    extra: dict = {"easgd": EASGDConfig(mode=mode)} if algorithm == "easgd" else {}
    cfg = config(
        tmp_path,
        algorithm,
        actor_timeout_s=5.0,
        checkpoint_every_steps=16,
        straggler_delay_s={r: 0.03 for r in range(2)},
        **extra,
    )
    with Trainer(MODEL, DATA, cfg, worker_cls=slow_to_give_weights(flag)) as trainer:
        server = ray.get(trainer.global_leader.__ray_call__.remote(lambda coordinator: coordinator.server))
        pid = ray.get(server.__ray_call__.remote(lambda _: os.getpid()))
        once_checkpointed(cfg.output_dir, lambda: (open(flag, "w").close(), os.kill(pid, signal.SIGKILL)))
        result = trainer.fit()
    (replaced,) = [e for e in result.events if e["event"] == "server_replaced"]
    assert replaced["from"].startswith("the center in checkpoint step-"), replaced
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


@pytest.mark.timeout(300)
def test_a_server_and_then_a_local_leader_lost_are_both_recovered(tmp_path):
    """After the server's recovery, the loss of a LocalLeader (its workers with it) re-forms
    the group, as without it: the recovery of the one does not stand in the way of the other."""
    cfg = config(tmp_path, "easgd", straggler_delay_s={r: 0.03 for r in range(2)}, easgd=EASGDConfig(mode="async"))
    with Trainer(MODEL, DATA, cfg) as trainer:
        server = ray.get(trainer.global_leader.__ray_call__.remote(lambda coordinator: coordinator.server))
        strike(ray.get(server.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL, after_s=1.0)
        leader = ray.get(trainer.local_leaders[0].__ray_call__.remote(lambda _: os.getpid()))
        strike(leader, signal.SIGKILL, after_s=2.0)
        result = trainer.fit()
    events = [e["event"] for e in result.events]
    assert events.count("server_replaced") == 1 and events.count("group_replaced") == 1, result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error


def kills_the_server_when_asked_for_stats(pid_file, max_steps):
    """A Worker class whose rank 0 SIGKILLs the ParameterServer (its pid in ``pid_file``) when
    the driver asks for its statistics at the run's end, between the final evaluation and the
    save of the final weights, and waits until it is gone."""

    class KillsTheServer(Worker):
        def stats(self):
            if self.rank == 0 and self.steps == max_steps and os.path.exists(pid_file):
                with open(pid_file) as f:
                    pid = int(f.read())
                os.remove(pid_file)
                os.kill(pid, signal.SIGKILL)
                while os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.01)
            return super().stats()

    return KillsTheServer


@pytest.mark.timeout(300)
def test_a_server_replaced_while_the_final_weights_are_saved_is_in_the_results_events(tmp_path):
    """The save of the final weights asks the coordinator for them, which replaces a lost
    ParameterServer first: that event was left out of result.json (the events were read
    before the save)."""
    cfg = config(tmp_path, "easgd")
    pid_file = str(tmp_path / "server-pid")
    with Trainer(MODEL, DATA, cfg, worker_cls=kills_the_server_when_asked_for_stats(pid_file, 96)) as trainer:
        server = ray.get(trainer.global_leader.__ray_call__.remote(lambda coordinator: coordinator.server))
        with open(pid_file, "w") as f:
            f.write(str(ray.get(server.__ray_call__.remote(lambda _: os.getpid()))))
        result = trainer.fit()
    assert not os.path.exists(pid_file), "the server was never struck"
    (replaced,) = [e for e in result.events if e["event"] == "server_replaced"]
    assert replaced["step"] == 96, replaced
    assert result.status == "completed" and os.path.exists(os.path.join(cfg.output_dir, "leader_state_dict.pt"))
    saved = json.loads(Path(cfg.output_dir, "result.json").read_text())
    assert [e["event"] for e in saved["events"]] == [e["event"] for e in result.events]


class DiesWhenEvaluated(Worker):
    """Worker 0 SIGKILLs itself when its weights are asked for (not counted: an evaluation's
    read) past its step 24, once per run (``flag``)."""

    flag = ""

    def get_weights(self, count=True):
        if self.rank == 0 and not count and self.steps >= 24 and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().get_weights(count)


@pytest.mark.timeout(300)
def test_data_parallels_evaluation_with_worker_0_lost_reads_a_live_workers_weights(tmp_path):
    """A chaos run's abort (data-parallel): worker 0's node was removed, and every attempt at
    the evaluation asked the lost worker 0 for the weights, until the run ended. Every worker
    holds the same weights: those of the workers that answer are evaluated, and the next round
    replaces worker 0."""
    flag = str(tmp_path / "worker-0-killed")
    cfg = config(tmp_path, "data_parallel", eval_every_s=0.5, straggler_delay_s={0: 0.03, 1: 0.03})
    with Trainer(MODEL, DATA, cfg, worker_cls=type("Dies", (DiesWhenEvaluated,), {"flag": flag})) as trainer:
        result = trainer.fit()
    assert os.path.exists(flag), "worker 0 was never asked for its weights past step 24"
    assert [e["rank"] for e in result.events if e["event"] == "worker_replaced"] == [0], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert len(result.history) >= 3 and result.final_test_accuracy > 0.6, result.history


class Gone:
    def ping(self):
        return True


class CallsADeadActor(Worker):
    """Worker 1 calls an actor of its own that died, at its step 20 (its own error: not a lost
    ParameterServer)."""

    def _step(self):
        super()._step()
        if self.rank == 1 and self.steps == 20:
            gone = ray.remote(Gone).options(num_cpus=0).remote()
            ray.kill(gone)
            ray.get(gone.ping.remote())


@pytest.mark.timeout(300)
def test_an_async_loop_that_lost_an_actor_other_than_the_server_ends_the_run_naming_it(tmp_path):
    """A loop that failed calling a dead actor is restarted only if that actor was a lost
    ParameterServer; any other is the worker's own error, which no restart mends (restarting
    it would fail again, for ever)."""
    cfg = config(tmp_path, "easgd", straggler_delay_s={r: 0.03 for r in range(2)}, easgd=EASGDConfig(mode="async"))
    expected = "worker 1's loop failed: lost an actor it called .*not a lost ParameterServer"
    with Trainer(MODEL, DATA, cfg, worker_cls=CallsADeadActor) as trainer, pytest.raises(RuntimeError, match=expected):
        trainer.fit()


@pytest.mark.timeout(300)
def test_easgds_server_whose_first_weights_died_is_started_again_with_the_set_up(tmp_path):
    """A chaos run's abort (async EASGD): a new coordinator started its ParameterServer from
    worker 0's weights, and worker 0 died before the server read them; the server never
    started and the restart failed later, on it. The set-up now waits for the server, so the
    driver replaces the worker and sets up again."""
    cfg = config(
        tmp_path, "easgd", num_groups=2, workers_per_group=1, straggler_delay_s={0: 0.03, 1: 0.03},
        checkpoint_every_steps=16,
    )  # fmt: skip
    flag = str(tmp_path / "coordinator-killed")

    def kill_the_coordinator(trainer):
        open(flag, "w").close()
        ray.kill(trainer.global_leader)

    with Trainer(MODEL, DATA, cfg, worker_cls=dies_giving_weights_after(flag)) as trainer:
        once_checkpointed(cfg.output_dir, lambda: kill_the_coordinator(trainer))
        result = trainer.fit()
    assert os.path.exists(flag + ".done"), "worker 0 was never asked for its weights after the kill"
    assert [e["rank"] for e in result.events if e["event"] == "worker_replaced"] == [0], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


@pytest.mark.timeout(300)
def test_a_worker_hung_when_a_new_peer_coordinator_starts_is_replaced_first(tmp_path):
    """A chaos run's abort (DiLoCo): a worker SIGSTOPped as the coordinator died made the new
    coordinator's set-up time out on it. The new coordinator finds it hung and replaces it
    before its set-up."""
    cfg = config(
        tmp_path, "data_parallel", num_groups=2, workers_per_group=1, straggler_delay_s={0: 0.03, 1: 0.03},
        checkpoint_every_steps=16, actor_timeout_s=5.0,
    )  # fmt: skip
    with Trainer(MODEL, DATA, cfg) as trainer:
        hung, _ = pids(trainer)[1]

        def stop_a_worker_and_kill_the_coordinator():
            os.kill(hung, signal.SIGSTOP)
            ray.kill(trainer.global_leader)

        once_checkpointed(cfg.output_dir, stop_a_worker_and_kill_the_coordinator)
        try:
            result = trainer.fit()
            weights = trainer.worker_weights()
        finally:
            kill_if_alive(hung)
    replaced = [e for e in result.events if e["event"] == "worker_replaced"]
    assert [e["rank"] for e in replaced] == [1] and "hung" in replaced[0]["reason"], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    np.testing.assert_array_equal(weights[1], weights[0])


@pytest.mark.timeout(300)
def test_a_gossip_peers_evaluation_averages_the_workers_that_answer(tmp_path):
    """A chaos run's abort (AL-DSGD): a worker lost between rounds made the evaluation of the
    workers' mean fail three times, and the run end. The mean is of the workers that answer;
    the lost one is replaced at the next round."""
    cfg = config(tmp_path, "aldsgd", num_groups=2, workers_per_group=2)
    with Trainer(MODEL, DATA, cfg) as trainer:
        dead(trainer.workers[3])
        record = trainer.evaluate_leader()
        result = trainer.fit()
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert [e["rank"] for e in result.events if e["event"] == "worker_replaced"] == [3], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["local_sgd", "diloco"])
def test_an_actor_lost_while_the_collective_re_forms_is_replaced_in_turn(tmp_path, algorithm):
    """Chaos runs' aborts (local SGD, DiLoCo): worker 2 is lost in a round, and while the group
    re-forms a second actor goes: local SGD's LocalLeader 1 (killed by worker 2's replacement
    as it is reset, as when a node goes), DiLoCo's worker 1 (as it leaves the broken group).
    The second loss is found and replaced in turn, the group formed again, and the round and
    the run finished."""
    cfg = config(
        tmp_path, algorithm, num_groups=3, workers_per_group=1, actor_timeout_s=10.0,
        local_sgd=LocalSGDConfig(tau=4, tau_global=16), diloco=DiLoCoConfig(tau_global=16),
    )  # fmt: skip
    flag = str(tmp_path / "killed")
    if algorithm == "local_sgd":
        cls = kills_its_local_leader_when_reset(2, 30, flag)  # the LocalLeader whose pid is in flag.pid
        second = flag + ".leader"
    else:
        second = flag + ".closed"
        cls = type("KilledThenDiesAtClose", (killed_at(2, 30, flag), dies_at_second_close(second)), {})
    with Trainer(MODEL, DATA, cfg, worker_cls=cls) as trainer:
        pid = ray.get(trainer.local_leaders[1].__ray_call__.remote(lambda _: os.getpid()))
        with open(flag + ".pid", "w") as f:
            f.write(str(pid))
        result = trainer.fit()
        weights = trainer.worker_weights()
    assert os.path.exists(second), "no second actor was lost during the recovery"
    replaced = [e["rank"] for e in result.events if e["event"] == "worker_replaced"]
    assert replaced == [2, 1], result.events
    groups = [e["group"] for e in result.events if e["event"] == "group_replaced"]
    assert groups == ([1] if algorithm == "local_sgd" else []), result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy
    for w in weights[1:]:  # 96 is a global averaging (outer) step: every worker ends on the same weights
        np.testing.assert_allclose(w, weights[0], rtol=0, atol=1e-6)


def skips_a_global_average(step, flag, always=False):
    """A Worker class whose rank 1 leaves out its global average after its step ``step`` (once
    per run, ``flag``; ``always``: raises its own error there instead, every time): rank 0 waits
    in the all-reduce for it until the gloo timeout."""

    class SkipsAnAverage(Worker):
        def average_weights(self, scope):
            if self.rank == 1 and self.steps == step and scope == "global":
                if always:
                    raise ValueError("its own error")
                if not os.path.exists(flag):
                    open(flag, "w").close()
                    return None
            return super().average_weights(scope)

    return SkipsAnAverage


@pytest.mark.timeout(300)
def test_a_collective_broken_with_no_worker_lost_is_formed_again_and_the_round_done_again(tmp_path):
    """A chaos run's abort (local SGD): every member's collective timed out and none was lost,
    which ended the run. The group is formed again and the round done once more."""
    cfg = config(
        tmp_path, "local_sgd", num_groups=2, workers_per_group=1, actor_timeout_s=5.0,
        local_sgd=LocalSGDConfig(tau=4, tau_global=16),
    )  # fmt: skip
    flag = str(tmp_path / "skipped")
    with Trainer(MODEL, DATA, cfg, worker_cls=skips_a_global_average(32, flag)) as trainer:
        result = trainer.fit()
        weights = trainer.worker_weights()
    assert os.path.exists(flag), "worker 1 never left out its average"
    assert not [e for e in result.events if e["event"] == "worker_replaced"], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    np.testing.assert_allclose(weights[1], weights[0], rtol=0, atol=1e-6)


@pytest.mark.timeout(300)
def test_a_workers_own_error_in_a_collective_round_ends_the_run_after_one_more_try(tmp_path):
    cfg = config(
        tmp_path, "local_sgd", num_groups=2, workers_per_group=1, actor_timeout_s=5.0,
        local_sgd=LocalSGDConfig(tau=4, tau_global=16),
    )  # fmt: skip
    cls = skips_a_global_average(32, str(tmp_path / "unused"), always=True)
    expected = "train failed after the group was re-formed: .*its own error"
    with Trainer(MODEL, DATA, cfg, worker_cls=cls) as trainer, pytest.raises(RuntimeError, match=expected):
        trainer.fit()


def kills_a_pid_and_itself(step, flag):
    """A Worker class whose rank 0, right after its step ``step``, SIGKILLs the process (another
    worker, a LocalLeader) whose pid is in the file ``flag + ".pid"``, then itself (once per
    run: ``flag``): two losses in one round. Rank 1 waits after the same step until rank 0 has
    struck (at most 60 s), so that its round is still in flight: the coordinator learns of
    both losses from that round's calls (rank 1, done first, would leave its LocalLeader's
    death unseen until a later call)."""

    class KillsBoth(Worker):
        def _step(self):
            super()._step()
            if self.rank == 1 and self.steps == step:
                deadline = time.monotonic() + 60.0
                while not os.path.exists(flag) and time.monotonic() < deadline:
                    time.sleep(0.05)
            if self.rank == 0 and self.steps == step and not os.path.exists(flag):
                open(flag, "w").close()
                with open(flag + ".pid") as f:
                    os.kill(int(f.read()), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    return KillsBoth


@pytest.mark.timeout(300)
def test_a_collective_that_loses_every_worker_goes_on_from_the_last_checkpoint(tmp_path):
    """A chaos run's abort (local SGD, two workers): a node removed and the other worker killed
    in the same round left no survivor to restart the group from. The same coordinator replaces
    them all and the run's last checkpoint is put into every worker; the run completes."""
    cfg = config(tmp_path, "data_parallel", num_groups=2, workers_per_group=1, checkpoint_every_steps=16)
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=kills_a_pid_and_itself(37, flag)) as trainer:
        with open(flag + ".pid", "w") as f:
            f.write(str(pids(trainer)[1][0]))  # worker 1, killed by worker 0 with itself
        result = trainer.fit()
        weights = trainer.worker_weights()
    assert os.path.exists(flag), "worker 0 never struck"
    restored = [e for e in result.events if e["event"] == "checkpoint_restored"]
    assert len(restored) == 1, result.events
    assert "every worker of the collective group was lost" in restored[0]["reason"]
    # the round that lost them began at the checkpoint's step: it is done again from there
    assert restored[0]["from_checkpoint"].endswith("step-000000032") and restored[0]["step"] == 32, restored
    assert sorted(e["rank"] for e in result.events if e["event"] == "worker_replaced") == [0, 1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy
    np.testing.assert_array_equal(weights[1], weights[0])


def gossip_run_striking_local_leader_1(tmp_path, worker_cls_of):
    """A D-PSGD run of two single-worker groups whose Worker class, ``worker_cls_of(37, flag)``,
    strikes LocalLeader 1 (its pid in ``flag + ".pid"``): the run's result, and ``flag``."""
    cfg = config(tmp_path, "dpsgd", num_groups=2, workers_per_group=1, checkpoint_every_steps=16)
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=worker_cls_of(37, flag)) as trainer:
        pid = ray.get(trainer.local_leaders[1].__ray_call__.remote(lambda _: os.getpid()))
        with open(flag + ".pid", "w") as f:
            f.write(str(pid))
        return trainer.fit(), flag


@pytest.mark.timeout(300)
def test_a_gossip_worker_left_with_no_published_weights_restarts_from_its_checkpoint(tmp_path):
    """A chaos run's lost accuracy (D-PSGD, two workers): worker 0 died in the round in which
    the other group's LocalLeader died with the weights it published. Worker 0's replacement
    had nothing to mix and started from the initial weights; it now starts from its own
    weights in the run's last checkpoint (the other from worker 0's last published ones)."""
    result, flag = gossip_run_striking_local_leader_1(tmp_path, kills_a_pid_and_itself)
    assert os.path.exists(flag), "worker 0 never struck"
    origins = {e["rank"]: e["from"] for e in result.events if e["event"] == "worker_replaced"}
    assert origins == {
        0: "worker 0's weights in checkpoint step-000000032",
        1: "the mean of the other workers' weights",
    }, result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def whose_replacement_strikes_unseen(step, flag):
    """A Worker class whose rank 0 SIGKILLs itself right after its step ``step``; its
    replacement, once started (``ready``), SIGKILLs the process whose pid is in ``flag + ".pid"``
    (the other group's LocalLeader, whose round is over). The replacement then fails to read the
    neighbours' weights it is handed (``OwnerDiedError``, as Ray's read fails where those weights
    are on another node; one node's object store keeps a readable copy) until it is given none:
    restarted from the checkpoint. Once per run (files ``flag``, ``.2``, ``.3``)."""

    class StrikesUnseen(killed_at(0, step, flag)):
        def ready(self):
            if self.rank == 0 and os.path.exists(flag) and not os.path.exists(flag + ".2"):
                open(flag + ".2", "w").close()
                with open(flag + ".pid") as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            return super().ready()

        def train_gossip(self, num_steps, self_weight, weights, *neighbours):
            if self.rank == 0 and os.path.exists(flag + ".2") and not os.path.exists(flag + ".3"):
                if neighbours:
                    raise OwnerDiedError("0" * 56, None, "the dead LocalLeader's published weights")
                open(flag + ".3", "w").close()
            return super().train_gossip(num_steps, self_weight, weights, *neighbours)

    return StrikesUnseen


@pytest.mark.timeout(300)
def test_a_gossip_replacement_whose_neighbours_leader_dies_unseen_restarts_from_its_checkpoint(tmp_path):
    """A chaos run's abort (D-PSGD, c700486, seed 8: "workers keep failing in train_gossip"):
    worker 0's replacement was handed the other group's published weights, whose LocalLeader had
    answered the round and died since. The retry called worker 0's group alone, so nothing saw
    that death, and the same lost input was handed out pass after pass. The coordinator now asks
    every LocalLeader on a lost input, re-forms the dead one's group, and restarts worker 0 again,
    from its checkpoint (a replacement's own weights are not the round's)."""
    result, flag = gossip_run_striking_local_leader_1(tmp_path, whose_replacement_strikes_unseen)
    assert os.path.exists(flag + ".3"), "worker 0 was never restarted without its neighbour's weights"
    replaced = [(e["rank"], e["from"]) for e in result.events if e["event"] == "worker_replaced"]
    assert replaced[0] == (0, "the mean of the other workers' weights"), result.events
    assert sorted(replaced[1:]) == [
        (0, "worker 0's weights in checkpoint step-000000032"),
        (1, "the mean of the other workers' weights"),
    ], result.events
    assert [e["group"] for e in result.events if e["event"] == "group_replaced"] == [1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


PRODUCT = os.path.dirname(os.path.abspath(sys.modules["lsgd_ray"].__file__))  # the package's own frames


def dies_as_its_events_are_taken(flag):
    """To run in a LocalLeader (``__ray_call__``): from then on, once (``flag``), its process
    SIGKILLs itself when a coordinator takes events that tell of a replaced worker
    (``take_events`` called remotely, not within one of its own rounds): it dies right after it
    answered the replacement."""

    def install(local_leader):
        class DiesAsItsEventsAreTaken(type(local_leader)):
            @property
            def events(self):
                events = self.__dict__["events"]
                caller = sys._getframe(1)
                if (
                    caller.f_code.co_name == "take_events"
                    and not caller.f_back.f_code.co_filename.startswith(PRODUCT)  # Ray's call, not a round's
                    and any(e["event"] == "worker_replaced" for e in events)
                    and not os.path.exists(flag)
                ):
                    open(flag, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                return events

            @events.setter
            def events(self, value):
                self.__dict__["events"] = value

        local_leader.__class__ = DiesAsItsEventsAreTaken

    return install


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm, mode", [("dpsgd", "sync"), ("easgd", "async")])
def test_a_local_leader_lost_right_after_it_replaced_a_worker_is_re_formed(tmp_path, algorithm, mode):
    """A chaos run's abort (D-PSGD, ec2c6bc, seed 8: ``ActorDiedError`` out of the round): a
    LocalLeader answered the replacement of its worker and died before the coordinator took the
    replacement's events. The coordinator now re-forms that group (asynchronous EASGD: and
    starts its loop), and the run completes."""
    extra = {"easgd": EASGDConfig(mode=mode)} if algorithm == "easgd" else {}
    cfg = config(tmp_path, algorithm, num_groups=2, workers_per_group=1, checkpoint_every_steps=16, **extra)
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=killed_at(0, 37, flag)) as trainer:
        ray.get(trainer.local_leaders[0].__ray_call__.remote(dies_as_its_events_are_taken(flag + ".ll")))
        result = trainer.fit()
    assert os.path.exists(flag + ".ll"), "LocalLeader 0 never died as its events were taken"
    reformed = [e for e in result.events if e["event"] == "group_replaced"]
    assert [e["group"] for e in reformed] == [0], result.events
    assert "its LocalLeader died" in reformed[0]["reason"], reformed
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy


def killed_when_evaluated(step, flag):
    """A Worker class whose every process SIGKILLs itself when its weights are read for an
    evaluation (``get_weights(count=False)``) past its step ``step``, once per rank (files
    ``flag.<rank>``): no worker answers that evaluation."""

    class KilledWhenEvaluated(Worker):
        def get_weights(self, count=True):
            mark = f"{flag}.{self.rank}"
            if not count and self.steps >= step and not os.path.exists(mark):
                open(mark, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().get_weights(count=count)

    return KilledWhenEvaluated


@pytest.mark.timeout(300)
def test_an_evaluation_no_worker_answers_is_made_after_the_next_round(tmp_path):
    """A chaos run's abort (AL-DSGD, ec2c6bc, seed 8: "no worker answered within 5s: no weights
    to average"): every worker was lost between two rounds, and the synchronous run's evaluation
    of their mean ended it. The evaluation is now postponed: the next round replaces the workers
    (here all of them: from the last checkpoint), the evaluation follows, and the run completes."""
    cfg = config(tmp_path, "aldsgd", num_groups=2, workers_per_group=1, checkpoint_every_steps=16, eval_every_s=0.5)
    flag = str(tmp_path / "killed")
    with Trainer(MODEL, DATA, cfg, worker_cls=killed_when_evaluated(40, flag)) as trainer:
        result = trainer.fit()
    assert os.path.exists(flag + ".0") and os.path.exists(flag + ".1"), "the workers were never struck"
    assert sorted(e["rank"] for e in result.events if e["event"] == "worker_replaced") == [0, 1], result.events
    assert result.status == "completed" and result.steps_per_worker == 96, result.error
    steps = [h["step"] for h in result.history]
    assert steps == sorted(steps) and steps[-1] == 96, steps  # evaluations went on after the loss
    assert result.final_test_accuracy > 0.6, result.final_test_accuracy
