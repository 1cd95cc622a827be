"""Update rules as small, communication-free functions over flat tensors.

Each algorithm is one module here; its transport lives in ``lsgd_ray._internal`` (LSGD's in the
GlobalLeader and LocalLeaders, the peers' in ``_internal/peer_coordinators.py``,
``peer_gossip.py`` and ``peer_server.py``). ``ALGORITHMS`` (``registry.py``) has one row per name users pass (config
``algorithm``, CLI ``--algorithm``): its rules, settings, coordinator and byte theory.
"""

from lsgd_ray.algorithms import data_parallel, downpour, easgd, gossip, local_sgd, lsgd
from lsgd_ray.algorithms.registry import ALGORITHMS, Algorithm

__all__ = ["ALGORITHMS", "Algorithm", "data_parallel", "downpour", "easgd", "gossip", "local_sgd", "lsgd"]
