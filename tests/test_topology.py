"""Topology as a pure function of fake node lists."""

import pytest

from lsgd_ray.topology import NodeInfo, PlacementError, check_available, node_with_room, nodes_from_ray, plan_topology


def node(name, cpu=0, gpu=0, head=False):
    res = {"CPU": cpu}
    if gpu:
        res["GPU"] = gpu
    if head:
        res["node:__internal_head__"] = 1.0
    return NodeInfo(node_id=name, resources=res)


def test_default_one_group_per_node_one_worker_per_gpu():
    nodes = [node("a", cpu=16, gpu=4), node("b", cpu=16, gpu=2)]
    topo = plan_topology(nodes, gpus_per_worker=1)
    assert [(g.node_id, g.num_workers, g.first_rank) for g in topo.groups] == [("a", 4, 0), ("b", 2, 4)]
    assert topo.worker_resources == {"CPU": 1.0, "GPU": 1.0}
    assert topo.group_of(5) == (1, 1)


def test_default_cpu_only_uses_cpu_slots_and_skips_empty_head():
    nodes = [node("head", cpu=0, head=True), node("a", cpu=8), node("b", cpu=6)]
    topo = plan_topology(nodes, cpus_per_worker=2)
    assert [(g.node_id, g.num_workers) for g in topo.groups] == [("a", 4), ("b", 3)]


def test_override_packs_groups_round_robin():
    nodes = [node("a", cpu=8), node("b", cpu=8)]
    topo = plan_topology(nodes, num_groups=4, workers_per_group=4)
    assert [g.node_id for g in topo.groups] == ["a", "b", "a", "b"]
    assert topo.num_workers == 16
    assert [list(g.ranks) for g in topo.groups][3] == [12, 13, 14, 15]


def test_override_on_one_node():
    topo = plan_topology([node("a", cpu=8)], num_groups=2, workers_per_group=2)
    assert [(g.node_id, g.num_workers) for g in topo.groups] == [("a", 2), ("a", 2)]


def test_workers_per_group_only_uses_nodes_that_fit():
    nodes = [node("a", cpu=4), node("b", cpu=2), node("c", cpu=8)]
    topo = plan_topology(nodes, workers_per_group=4)
    assert [g.node_id for g in topo.groups] == ["a", "c"]


def test_num_groups_only():
    nodes = [node("a", cpu=4), node("b", cpu=6)]
    topo = plan_topology(nodes, num_groups=2)
    assert topo.group_sizes == [4, 4]


def test_cannot_place_names_missing_resources():
    nodes = [node("a", cpu=2), node("b", cpu=2)]
    with pytest.raises(PlacementError) as err:
        plan_topology(nodes, num_groups=2, workers_per_group=4)
    assert "CPU=4" in str(err.value) and "2 group(s) x 4 worker(s)" in str(err.value)
    with pytest.raises(PlacementError, match="GPU"):
        plan_topology([node("a", cpu=8)], gpus_per_worker=1)


def test_nodes_from_ray_keeps_alive_head_first():
    raw = [
        {"NodeID": "zz", "Alive": True, "Resources": {"CPU": 2.0, "node:__internal_head__": 1.0}},
        {"NodeID": "aa", "Alive": True, "Resources": {"CPU": 4.0}},
        {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 4.0}},
    ]
    assert [n.node_id for n in nodes_from_ray(raw)] == ["zz", "aa"]


def test_busy_resources_are_named():
    topo = plan_topology([node("a", cpu=8), node("b", cpu=8)], num_groups=2, workers_per_group=4)
    check_available(topo, {"a": {"CPU": 8.0}, "b": {"CPU": 4.0}})
    with pytest.raises(PlacementError, match="node b needs CPU=4 for 4 worker.* has 1 free .missing 3"):
        check_available(topo, {"a": {"CPU": 8.0}, "b": {"CPU": 1.0}})


def test_a_lost_group_goes_to_the_first_node_with_free_room_for_all_its_workers():
    nodes = [node("head", cpu=0, head=True), node("a", cpu=4), node("b", cpu=4, gpu=2), node("c", cpu=8, gpu=2)]
    free = {"head": {}, "a": {"CPU": 4.0}, "b": {"CPU": 1.0, "GPU": 2.0}, "c": {"CPU": 3.0, "GPU": 1.0}}
    assert node_with_room(nodes, free, {"CPU": 1.0}, 3) == "a"  # in the order given (head first)
    assert node_with_room(nodes, free, {"CPU": 1.0}, 5) is None  # no single node has 5 free
    assert node_with_room(nodes, free, {"CPU": 1.0, "GPU": 1.0}, 1) == "b"
    assert node_with_room(nodes, free, {"CPU": 1.0, "GPU": 1.0}, 2) is None  # b lacks CPUs, c a GPU
    assert node_with_room(nodes, free, {"CPU": 0.5}, 2) == "a"


def test_a_node_offers_no_room_held_for_the_runs_own_workers_there():
    """A worker of the run that just died freed its CPU, but its replacement is coming: a lost
    group must not take it (a chaos run did, and the replacement waited forever)."""
    nodes = [NodeInfo("a", {"CPU": 2.0}), NodeInfo("b", {"CPU": 2.0})]
    free = {"a": {"CPU": 2.0}, "b": {"CPU": 1.0}}  # a: both its workers just died; b: one of two free
    assert node_with_room(nodes, free, {"CPU": 1.0}, 1) == "a"  # free, as far as Ray can tell
    assert node_with_room(nodes, free, {"CPU": 1.0}, 1, planned={"a": 2}) == "b"
    assert node_with_room(nodes, free, {"CPU": 1.0}, 1, planned={"a": 2, "b": 2}) is None
    assert node_with_room(nodes, free, {"CPU": 1.0}, 1, planned={"a": 1}) == "a"  # 2 CPUs, 1 held
    assert node_with_room(nodes, free, {"CPU": 1.0}, 2, planned={"a": 1}) is None  # b has 1 free, a 1 unheld


def test_actors_report_through_logging_one_tagged_line_each(capfd):
    """What actors handled (a worker replaced, a group re-formed) goes to their stderr, which Ray
    forwards to the driver: one line tagged with the reporting actor, however often asked for."""
    import contextlib
    import io
    import logging

    from lsgd_ray._internal.protocol import actor_log

    logger = logging.getLogger("lsgd_ray.actors")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    with contextlib.redirect_stderr(io.StringIO()):  # made while sys.stderr was another stream
        actor_log("Worker 0")
    actor_log("LocalLeader 1").warning("worker 3 died: replaced")
    actor_log("GlobalLeader").info("group re-formed")
    err = capfd.readouterr().err.splitlines()
    assert err == ["lsgd-ray LocalLeader 1: worker 3 died: replaced", "lsgd-ray GlobalLeader: group re-formed"]
    logging.getLogger("lsgd_ray.actors").setLevel(logging.WARNING)  # a user's choice is kept
    actor_log("GlobalLeader").info("quiet now")
    assert capfd.readouterr().err == ""
    logging.getLogger("lsgd_ray.actors").setLevel(logging.INFO)
