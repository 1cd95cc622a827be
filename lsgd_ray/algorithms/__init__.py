"""Update rules as small, communication-free functions over flat tensors.

Each algorithm is one module here; its transport lives in ``lsgd_ray._internal`` (LSGD's in the
GlobalLeader and LocalLeaders, the peers' in ``_internal/peer_coordinators.py``). The registry
maps the names users pass (config ``algorithm``, CLI ``--algorithm``) to those modules.
"""

from lsgd_ray.algorithms import data_parallel, downpour, easgd, gossip, local_sgd, lsgd

ALGORITHMS = {
    "lsgd": lsgd,
    "easgd": easgd,
    "downpour": downpour,
    "local_sgd": local_sgd,
    "data_parallel": data_parallel,
    "dpsgd": gossip,
    "aldsgd": gossip,
}

__all__ = ["ALGORITHMS", "data_parallel", "downpour", "easgd", "gossip", "local_sgd", "lsgd"]
