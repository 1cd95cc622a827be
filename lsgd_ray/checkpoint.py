"""Checkpoints: committed atomically, verified on load, never executing code from the file.

A run's checkpoints live in ``<output_dir>/checkpoints/step-<steps per worker>/``, each holding

- ``state.pt``: the coordinator's state, every worker's state (weights, optimizer, RNGs, step
  counts), the trainer's history and clocks: tensors and plain Python values only, saved with
  ``torch.save`` and loaded with ``torch.load(weights_only=True)``, which refuses any pickle
  that names code;
- ``meta.json``: the step, the time, the code version, the config and the SHA-256 of
  ``state.pt`` (a truncated or altered file is caught before it is unpickled).

A checkpoint is written into a temporary directory, flushed to disk, and renamed into place:
a crash mid-write leaves the previous checkpoints intact. The last ``keep`` saved are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
STATE_FILE, META_FILE = "state.pt", "meta.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """No usable checkpoint: the message lists what was tried and why each was refused."""


def map_leaves(value: Any, kind: type | tuple[type, ...], fn: Callable[[Any], Any]) -> Any:
    """``value`` with every leaf of type ``kind`` replaced by ``fn(leaf)``, through dicts,
    lists and tuples (checkpoint states: tensors to the CPU, arrays to tensors and back)."""
    if isinstance(value, kind):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_leaves(v, kind, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_leaves(v, kind, fn) for v in value)
    return value


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Commit ``state`` as the checkpoint for ``step`` (replacing one of the same step) and
    delete all but the newest ``keep``. Returns the checkpoint's directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state_path = tmp / STATE_FILE
    fields = {"format": FORMAT, "step": step, "saved_at": time.time(), **meta}
    with open(state_path, "wb") as f:  # the state seals meta.json's fields, which order the checkpoints
        torch.save({"format": FORMAT, **state, "meta_digest": _fields_digest(fields)}, f)
        f.flush()
        os.fsync(f.fileno())
    info = {**fields, "sha256": _sha256(state_path)}
    with open(tmp / META_FILE, "w") as f:
        json.dump(info, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step again (e.g. the final checkpoint): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    # never the one just written (a clock set back could sort it below the others)
    for stale in [p for p in list_checkpoints(run_dir) if p != final][max(keep - 1, 0) :]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Committed checkpoints under a run directory (or its ``checkpoints/``), newest first: in
    the order they were saved, not by step. A name's step (the slowest worker's) can go back:
    an asynchronous worker replaced with no peer to copy a count from, a group that rejoins at
    an old checkpoint's step. By step, the checkpoint just written could be the one deleted as
    stale, and a restart would go back to an older one."""
    path = Path(path)
    root = path if path.name == "checkpoints" else checkpoint_root(path)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: (_saved_at(p), p.name), reverse=True)


def _saved_at(directory: Path) -> float:
    """When a checkpoint was committed: its ``meta.json``'s ``saved_at``; one whose
    ``meta.json`` cannot be read counts as the oldest (``read_checkpoint`` refuses it anyway)."""
    try:
        return float(json.loads((directory / META_FILE).read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def read_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """One checkpoint's state, after checking its digest; raises ``CheckpointError`` if it is
    missing, altered, truncated, of another format, or names code in its pickle."""
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing")
    if _sha256(state_path) != meta.get("sha256"):
        raise CheckpointError(f"{state_path}: contents do not match the SHA-256 in {META_FILE} (truncated or altered)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses code; a damaged file fails to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{state_path}: refused by the weights-only loader ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not an lsgd-ray checkpoint of format {FORMAT}")
    sealed = state.pop("meta_digest", None)  # None: written before 2026-12-06
    if sealed is not None and sealed != _fields_digest({k: v for k, v in meta.items() if k != "sha256"}):
        raise CheckpointError(f"{meta_path}: its fields do not match the digest in {STATE_FILE} (altered)")
    return state


def _fields_digest(fields: dict[str, Any]) -> str:
    """SHA-256 of meta.json's fields but the state's digest, as JSON gives them back: a damage
    that leaves it valid JSON (a ``saved_at`` key or digit changed) made ``load_latest`` take an
    older checkpoint while this one still read as sound."""
    canonical = json.dumps(json.loads(json.dumps(fields, default=str)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_latest(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint under ``path`` (a run directory, its ``checkpoints/``, or one
    checkpoint directory); an unusable one is reported on stderr and the previous one tried."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    candidates = [path] if (path / META_FILE).exists() else list_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"nothing to resume: no checkpoints under {path} (expected {checkpoint_root(path)})")
    refused = []
    for candidate in candidates:
        try:
            return read_checkpoint(candidate), candidate
        except CheckpointError as exc:
            refused.append(str(exc))
            print(f"lsgd-ray: skipping checkpoint {candidate.name}: {exc}", file=sys.stderr, flush=True)
    raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(refused))


def leader_worker(state: dict[str, Any]) -> dict[str, Any]:
    """The saved state of the worker that led when ``state`` was written (the first saved worker
    if the leader's group was not in it): where a worker with no state of its own starts."""
    saved = {w["rank"]: w for w in state["workers"]}
    leader = state["coordinator"].get("leader", -1)
    return saved[leader] if leader in saved else next(iter(saved.values()))
