"""Several raylets on one machine (ray.cluster_utils.Cluster): one group per node."""

import functools

import pytest
import ray
from ray.cluster_utils import Cluster

from lsgd_ray import DataParallelConfig, DiLoCoConfig, EASGDConfig, LSGDConfig, TrainConfig, Trainer
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (16,), 4, hidden=32)
DATA = functools.partial(synthetic, n_train=1024, n_test=512)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.mark.timeout(300)
def test_each_group_runs_on_its_own_node_and_converges(cluster, tmp_path):
    c, nodes = cluster
    cfg = TrainConfig(
        batch_size=32,
        epochs=8,
        eval_every_s=2.0,
        lsgd=LSGDConfig(tau=2, tau_global=4),
        output_dir=str(tmp_path / "run"),
        quiet=True,
    )
    with Trainer(MODEL, DATA, cfg) as trainer:
        # default topology: the head has no CPUs, so one group of 2 workers per worker node
        assert trainer.topology.group_sizes == [2, 2]
        planned = [g.node_id for g in trainer.topology.groups]
        assert sorted(planned) == sorted(n.node_id for n in nodes)
        for plan, info in zip(trainer.topology.groups, trainer.group_infos):
            assert info["node_id"] == plan.node_id  # the LocalLeader is on its node
            assert [w["node_id"] for w in info["workers"]] == [plan.node_id] * 2  # and so are its workers
        result = trainer.fit()
    assert result.status == "completed"
    assert result.final_test_accuracy > 0.7  # chance is 0.25
    assert result.final_center_test_accuracy > 0.7  # group means from both nodes, combined on the head
    assert {g["node_id"] for g in result.topology} == {n.node_id for n in nodes}
    # leader weights crossed nodes: every worker received some
    assert all(w["bytes_received"] > 0 for w in result.communication["per_worker"])


VARIANTS = {  # name: (algorithm, settings)
    "easgd_async": ("easgd", {"easgd": EASGDConfig(mode="async")}),
    "data_parallel_powersgd": ("data_parallel", {"data_parallel": DataParallelConfig(compression="powersgd")}),
    # one fragment of the pseudo-gradients across the nodes every 4 steps, in bfloat16
    "diloco_streaming_bf16": ("diloco", {"diloco": DiLoCoConfig(tau_global=8, fragments=2), "comm_dtype": "bfloat16"}),
    "lsgd_bf16": ("lsgd", {"comm_dtype": "bfloat16"}),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "algorithm",
    ["data_parallel", "local_sgd", "easgd", "downpour", "dpsgd", "aldsgd", "diloco", *VARIANTS],
)
def test_every_peer_trains_across_nodes(cluster, tmp_path, algorithm):
    """Collectives across raylets, the parameter server on another node, neighbours' weights
    read from another node's object store."""
    c, nodes = cluster
    name, settings = VARIANTS.get(algorithm, (algorithm, {}))
    cfg = TrainConfig(
        algorithm=name,
        batch_size=32,
        epochs=6,
        eval_every_s=2.0,
        output_dir=str(tmp_path / "run"),
        quiet=True,
        **settings,
    )
    with Trainer(MODEL, DATA, cfg) as trainer:
        assert sorted(g.node_id for g in trainer.topology.groups) == sorted(n.node_id for n in nodes)
        result = trainer.fit()
    assert result.status == "completed"
    assert result.final_test_accuracy > 0.7  # chance is 0.25
    assert all(w["bytes_received"] > 0 for w in result.communication["per_worker"])
