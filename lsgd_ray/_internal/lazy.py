"""Modules imported at their first use, so that a process which only holds Worker handles never
imports torch.

Ray imports an actor class's module wherever a handle to that actor is unpickled, and every
LocalLeader and coordinator holds Worker handles. The Worker's modules therefore name torch (and
the package's modules that import it) through :func:`lazy_module`: a LocalLeader or a
GlobalLeader imports them without loading torch (about 2 s of CPU per process at start-up), and a
Worker loads them in its ``__init__`` (:func:`load`), before any of its threads run.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module that is executed at its first attribute access (importlib's
    ``LazyLoader``); the module itself where it is already imported."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def load(*modules: ModuleType) -> None:
    """Execute ``modules`` now if they are still lazy. A Worker does so before its threads
    start: before Python 3.12 two threads touching a lazy module at once could both run it."""
    for module in modules:
        _ = module.__name__  # any attribute access executes a lazy module
