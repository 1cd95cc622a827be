"""Measure what crosses a link of a Ray cluster: a large object and a gloo all-reduce.

Run from a driver joined to the cluster (``lsgd-ray cluster measure`` does it in an emulated
cluster's node 0); prints one JSON object. The object moves from an actor on another node to
the driver; the all-reduce runs between an actor on the driver's node and one on the other node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lsgd_ray._internal.protocol import actor_class


class _Holder:
    """Makes objects on its node for the driver to fetch."""

    def make(self, nbytes: int, seed: int) -> list[ray.ObjectRef]:
        data = np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)
        return [ray.put(data)]  # wrapped: the caller fetches it when it chooses


class _GlooRank:
    def __init__(self, rank: int, master: str, port: int) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=2)

    def allreduce_s(self, nbytes: int, repeats: int) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.ones(nbytes // 4)
        dist.all_reduce(tensor)  # warm-up: connections made
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        return times


# per TCP segment: Ethernet header (14 bytes, counted by tc on a veth) on top of the IP packet;
# IP (20) and TCP with timestamps (32) headers inside it
ETHERNET_HEADER, IP_TCP_HEADERS = 14, 52


def wire_overhead(mtu: int) -> float:
    """Bytes a link shaper counts per byte of TCP payload, for full segments at ``mtu``."""
    return (mtu + ETHERNET_HEADER) / (mtu - IP_TCP_HEADERS)


def link_mtu(ifname: str) -> int:
    """The MTU of ``ifname`` in this namespace (1500 where it cannot be read)."""
    try:
        with open(f"/sys/class/net/{ifname}/mtu") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1500


def _on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def measure(object_mb: float = 24.0, allreduce_mib: float = 1.0, repeats: int = 3, port: int = 29517) -> dict[str, Any]:
    """Object transfer rate and all-reduce time between the driver's node and another node."""
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        raise RuntimeError("the cluster has one node: nothing crosses a link")
    other, me = others[0], next(n for n in ray.nodes() if n["NodeID"] == here)
    holder = actor_class(_Holder, num_cpus=0, scheduling_strategy=_on(other["NodeID"])).remote()
    nbytes = int(object_mb * 1e6)
    transfers = []
    for seed in range(repeats):
        (ref,) = ray.get(holder.make.remote(nbytes, seed))  # made on the other node, not yet here
        start = time.perf_counter()
        ray.get(ref)
        transfers.append(time.perf_counter() - start)
        del ref
    master = me["NodeManagerAddress"]
    ranks = [
        actor_class(_GlooRank, num_cpus=0, scheduling_strategy=_on(node["NodeID"])).remote(rank, master, port)
        for rank, node in enumerate((me, other))
    ]
    ar_bytes = int(allreduce_mib * 2**20)
    times = ray.get([r.allreduce_s.remote(ar_bytes, max(repeats, 5)) for r in ranks])
    allreduce_s = statistics.median(max(pair) for pair in zip(*times))
    ring_bits = 2 * (2 - 1) / 2 * ar_bytes * 8
    mtu = link_mtu(os.environ.get("GLOO_SOCKET_IFNAME", ""))
    transfer_s = statistics.median(transfers)
    return {
        "from": other["NodeManagerAddress"],
        "to": me["NodeManagerAddress"],
        "object_bytes": nbytes,
        "object_s": transfer_s,
        "object_mbit_s": nbytes * 8 / transfer_s / 1e6,
        "allreduce_bytes": ar_bytes,
        "allreduce_s": allreduce_s,
        # ring all-reduce of n ranks: each sends and receives 2(n-1)/n of the buffer
        "allreduce_ring_bits": ring_bits,
        # what a shaper counts for it: each TCP segment on the wire carries its headers too
        "allreduce_wire_bits": ring_bits * wire_overhead(mtu),
        "mtu": mtu,
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME", ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--object-mb", type=float, default=24.0)
    p.add_argument("--allreduce-mib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ray.init(logging_level=logging.ERROR)
    print(json.dumps(measure(args.object_mb, args.allreduce_mib, args.repeats)))


if __name__ == "__main__":
    main()
