"""The Linux pieces of the emulated cluster, through iproute2: what it needs (root or
CAP_NET_ADMIN, ``ip``, ``tc``, Ray's CLI), commands in a namespace, the processes living in one,
and link rates as ``tc`` takes them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class ClusterError(RuntimeError):
    """The emulated cluster cannot be made, found or used; the message says why in one line."""


def parse_rate(text: str) -> int | None:
    """Link rate in bits/s from ``100mbit``, ``1gbit``, ``30mbit``, ``500kbit``; None for ``none``."""
    text = str(text).strip().lower()
    if text in ("none", "unlimited", "0"):
        return None
    match = _RATE.match(text)
    if match is None:
        raise ClusterError(
            f"link rate {text!r} not understood: use a number with bit, kbit, mbit or gbit "
            "(e.g. 100mbit, 1gbit), or none for an unshaped link"
        )
    bits = round(float(match.group(1)) * _UNITS[match.group(2)])
    if bits < 8_000:
        raise ClusterError(f"link rate {text!r} is below 8kbit, too slow for Ray to start")
    return bits


def format_rate(bits: int | None) -> str:
    if bits is None:
        return "none"
    for unit in ("gbit", "mbit", "kbit"):
        if bits % _UNITS[unit] == 0:
            return f"{bits // _UNITS[unit]}{unit}"
    return f"{bits}bit"


def tbf_burst_bytes(bits: int) -> int:
    """The bucket: 2 ms at the rate, at least 64 KiB (one offloaded segment), so a fast link is
    not held below its rate by timer granularity (1 Gbit/s moved at 0.80 of its rate with 64 KiB
    here, at 0.97 with 256 KiB)."""
    return max(64 * 1024, bits // 8 // 500)


def check_prerequisites() -> None:
    """Raise ClusterError naming what is missing: root/CAP_NET_ADMIN, iproute2, Ray's CLI."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"{' and '.join(missing)} not found: install iproute2 (e.g. apt-get install iproute2)")
    if ray_cli() is None:
        raise ClusterError("the `ray` command is not found next to this Python or on PATH: pip install 'ray[default]'")
    if os.geteuid() != 0 and not _has_cap_net_admin():
        raise ClusterError("network namespaces need root or CAP_NET_ADMIN: run as root (e.g. sudo)")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ClusterError(f"`ip netns` does not work here: {probe.stderr.strip() or probe.returncode}")


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) & (1 << 12))  # CAP_NET_ADMIN


def ray_cli() -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), "ray")
    return local if os.access(local, os.X_OK) else shutil.which("ray")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def in_namespace(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", namespace, *args, check=check)


def namespace_pids(namespace: str) -> list[int]:
    out = sh("ip", "netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split()]


def signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, sig)


def namespaces_of(name: str) -> list[str]:
    """Every namespace on the machine that belongs to the emulated cluster ``name``."""
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    return [n for n in names if n == f"{name}-sw" or re.fullmatch(rf"{re.escape(name)}-n\d+", n)]


def stop_processes_in(namespaces: Sequence[str], grace_s: float, first: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first`` to every process living in ``namespaces`` (by pid, never by name), SIGKILL
    what is left after ``grace_s``, then wait up to ``grace_s`` more until none is left (a killed
    process leaves its namespace a moment later)."""

    def living() -> set[int]:
        return {pid for ns in namespaces for pid in namespace_pids(ns)}

    for sig in (first, signal.SIGKILL):
        pids = living()
        signal_all(pids, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = living()
