"""Modules imported at their first use, so that a process which only holds Worker handles never
imports torch.

Ray imports an actor class's module wherever a handle to that actor is unpickled, and every
LocalLeader and coordinator holds Worker handles. The Worker's modules therefore name torch (and
the package's modules that import it) through :func:`lazy_module`: a LocalLeader or a
GlobalLeader imports them without importing torch (about 2 s of CPU per process at start-up), and
a Worker imports them in its ``__init__`` (:func:`load`).

Not importlib's ``LazyLoader``: it puts an unexecuted module into ``sys.modules``, and a leader
that then imported torch from two threads at once (a worker's exception unpickled in each) ran
torch's ``__init__`` twice and aborted ("cannot initialize type GradBucket: an object with that
name is already defined"; Python 3.11's ``LazyLoader`` takes no lock). A ``LazyModule`` stays out
of ``sys.modules``: every import goes through Python's own, locked import.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name``: the first attribute read imports it (an ordinary import,
    under the import lock), and every read after that is passed to it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:  # only for what is not the proxy's own
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (imported)'}>"


def lazy_module(name: str) -> Any:
    """``name``, imported at its first use (the module itself where it is already imported)."""
    return sys.modules.get(name) or LazyModule(name)


def load(*modules: Any) -> None:
    """Import ``modules`` now, where they are still lazy (a Worker, in its ``__init__``)."""
    for module in modules:
        if isinstance(module, LazyModule):
            module._load()
