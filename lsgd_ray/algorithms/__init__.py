"""Update rules as small, communication-free functions over flat tensors.

Each algorithm is one module here; its transport lives in ``lsgd_ray._internal``. The registry
maps the names users pass (config ``algorithm``, CLI ``--algorithm``) to those modules.
"""

from lsgd_ray.algorithms import lsgd

ALGORITHMS = {"lsgd": lsgd}

__all__ = ["ALGORITHMS", "lsgd"]
