"""An emulated multi-node Ray cluster on one Linux machine, joined by bandwidth-limited links.

Each node is a network namespace with one Ray node in it and one veth link to a bridge that
lives in a switch namespace of its own. Every link is shaped with ``tc tbf`` at the same rate in
both directions (the node's side shapes what it sends, the switch's port what it receives), so
traffic between two nodes pays the link, while traffic inside a node stays on that namespace's
loopback and shared memory: the fast intra-node path. The addresses come from one private /24
that exists only inside these namespaces: nothing in the machine's own namespace changes and no
packet leaves them.

What it does not model: added latency (this kernel has no ``netem``) and separate machines (all
nodes share this machine's cores and memory).

    with EmulatedCluster(nodes=2, cpus_per_node=2, link="100mbit") as cluster:
        cluster.run(["python", "-m", "lsgd_ray", "train", "--groups", "0"])

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (``ip``, ``tc``) and Ray's ``ray``
command. ``down`` stops exactly the processes that live in its own namespaces (``ip netns
pids``), never by name, then deletes the namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from lsgd_ray.netns import (
    ClusterError,
    check_prerequisites,
    format_rate,
    in_namespace,
    namespace_pids,
    namespaces_of,
    parse_rate,
    ray_cli,
    sh,
    stop_processes_in,
    tbf_burst_bytes,
)

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "EmulatedCluster",
    "check_prerequisites",
    "format_rate",
    "namespace_pids",
    "namespaces_of",
    "node_env",
    "parse_rate",
    "tbf_burst_bytes",
]

STATE_ROOT = os.environ.get("LSGD_RAY_CLUSTER_DIR", "/tmp/lsgd-ray-cluster")
SUBNET = "10.247.0"  # the /24 inside the namespaces; node i is SUBNET.(i + 1)
NODE_IFACE = "eth0"  # each node's link, as its namespace sees it (gloo is told to use it)
HEAD_PORT = 6379
RAY_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
# tbf's queue: at most this much waiting time per link before packets drop
TBF_LATENCY = "100ms"

_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


@dataclass(frozen=True)
class ClusterSpec:
    """What ``up`` builds: ``nodes`` namespaces of ``cpus_per_node`` Ray CPUs, links at ``link``."""

    nodes: int = 2
    cpus_per_node: int = 2
    link: str = "none"
    name: str = "lsgd"
    object_store_mb: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or not 1 <= self.nodes <= 200:
            raise ClusterError(f"nodes must be an integer from 1 to 200, got {self.nodes!r}")
        if not isinstance(self.cpus_per_node, int) or self.cpus_per_node < 1:
            raise ClusterError(
                f"cpus_per_node must be a positive integer (Ray's --num-cpus), got {self.cpus_per_node!r}"
            )
        if not _NAME.match(str(self.name)):
            raise ClusterError(
                f"cluster name must be 1-12 lowercase letters or digits, starting with a letter, got {self.name!r}"
            )
        if not isinstance(self.object_store_mb, int) or self.object_store_mb < 80:
            raise ClusterError(
                f"object_store_mb must be an integer >= 80 (Ray's minimum), got {self.object_store_mb!r}"
            )
        parse_rate(self.link)

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def namespace(self, node: int) -> str:
        return f"{self.name}-n{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    @property
    def head_address(self) -> str:
        return f"{self.address(0)}:{HEAD_PORT}"

    @property
    def state_dir(self) -> str:
        return os.path.join(STATE_ROOT, self.name)

    def temp_dir(self, node: int) -> str:
        # Ray's own temp dir per node: its sockets live there (kept short: a socket path has a
        # 107-byte limit) and no `ray_current_cluster` lands in /tmp/ray for a later ray.init().
        return os.path.join(self.state_dir, f"n{node}")


def node_env(spec: ClusterSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process of the emulated cluster (its Ray nodes and ``run``)."""
    env = dict(os.environ if base is None else base)
    env.update(
        RAY_ADDRESS=spec.head_address,
        # gloo binds to the address the hostname resolves to (127.0.0.1) unless told the link
        GLOO_SOCKET_IFNAME=NODE_IFACE,
        # the namespaces are reachable from nowhere else; a token would only have to be shared
        RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"),
        RAY_USAGE_STATS_ENABLED="0",
    )
    # the venv's `ray` and `python` first, whatever PATH the caller had
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


class EmulatedCluster:
    """A context manager around ``up`` and ``down``; also the state of a running cluster."""

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 2,
        link: str = "none",
        name: str = "lsgd",
        object_store_mb: int = 1024,
        *,
        quiet: bool = True,
    ) -> None:
        self.spec = ClusterSpec(nodes, cpus_per_node, link, name, object_store_mb)
        self.quiet = quiet

    @classmethod
    def attach(cls, name: str = "lsgd") -> EmulatedCluster:
        """The cluster ``name`` that ``up`` started earlier (maybe in another process)."""
        path = os.path.join(STATE_ROOT, name, "cluster.json")
        try:
            with open(path) as f:
                spec = json.load(f)["spec"]
        except (OSError, ValueError, KeyError) as exc:
            raise ClusterError(
                f"no emulated cluster {name!r} is up ({path}: {getattr(exc, 'strerror', None) or exc}); "
                f"start one with `lsgd-ray cluster up --name {name}`"
            ) from exc
        if not namespaces_of(name):
            raise ClusterError(f"emulated cluster {name!r} is not up: its namespaces are gone (run `cluster up`)")
        return cls(**spec)

    def __enter__(self) -> EmulatedCluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def address(self) -> str:
        return self.spec.head_address

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(f"cluster {self.spec.name}: {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ up

    def up(self) -> EmulatedCluster:
        """Build the namespaces and links, then start one Ray node in each (head in node 0)."""
        check_prerequisites()
        spec = self.spec
        if self.is_up():
            raise ClusterError(
                f"emulated cluster {spec.name!r} is already up: `lsgd-ray cluster down --name {spec.name}` first"
            )
        if namespaces_of(spec.name):
            self._say("cleaning up what an earlier run left behind")
            self.down()
        try:
            self._make_network()
            self._start_ray()
        except BaseException:
            self.down()
            raise
        self._save_state()
        return self

    def is_up(self) -> bool:
        """Whether a cluster of this name is running: its state saved and every node it was
        started with in its namespace, with processes (anything less is what a crash left)."""
        try:
            with open(os.path.join(self.spec.state_dir, "cluster.json")) as f:
                nodes = json.load(f)["spec"]["nodes"]
        except (OSError, ValueError, KeyError):
            return False
        present = set(namespaces_of(self.spec.name))
        return all(self.spec.namespace(i) in present and namespace_pids(self.spec.namespace(i)) for i in range(nodes))

    def _save_state(self) -> None:
        """What ``attach`` (the CLI's other verbs, another process) finds the cluster by."""
        os.makedirs(self.spec.state_dir, exist_ok=True)
        path = os.path.join(self.spec.state_dir, "cluster.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"spec": asdict(self.spec), "address": self.address}, f, indent=1)
        os.replace(path + ".tmp", path)

    def _make_network(self) -> None:
        spec = self.spec
        sh("ip", "netns", "add", spec.switch)
        in_namespace(spec.switch, "ip", "link", "set", "lo", "up")
        in_namespace(spec.switch, "ip", "link", "add", "br0", "type", "bridge")
        in_namespace(spec.switch, "ip", "link", "set", "br0", "up")
        for node in range(spec.nodes):
            ns, port = spec.namespace(node), f"port{node}"
            sh("ip", "netns", "add", ns)
            # both ends are created straight in their namespaces: nothing appears in ours
            sh("ip", "link", "add", NODE_IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns", spec.switch)
            in_namespace(spec.switch, "ip", "link", "set", port, "master", "br0")
            in_namespace(spec.switch, "ip", "link", "set", port, "up")
            in_namespace(ns, "ip", "link", "set", "lo", "up")
            in_namespace(ns, "ip", "addr", "add", f"{spec.address(node)}/24", "dev", NODE_IFACE)
            in_namespace(ns, "ip", "link", "set", NODE_IFACE, "up")
        self.set_link(spec.link)
        self._say(f"{spec.nodes} node(s) on {SUBNET}.0/24, links {spec.link}")

    def set_link(self, link: str, nodes: Sequence[int] | None = None) -> None:
        """Shape (or unshape, with ``none``) the links of ``nodes`` (default all), both ways; a
        running cluster's links can change mid-run."""
        bits = parse_rate(link)
        for node in range(self.spec.nodes) if nodes is None else nodes:
            for ns, dev in ((self.spec.namespace(node), NODE_IFACE), (self.spec.switch, f"port{node}")):
                if bits is None:
                    in_namespace(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    tbf = ["tbf", "rate", f"{bits}bit", "burst", str(tbf_burst_bytes(bits)), "latency", TBF_LATENCY]
                    in_namespace(ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)
        if nodes is None and link != self.spec.link:
            self.spec = replace(self.spec, link=link)
            if os.path.exists(os.path.join(self.spec.state_dir, "cluster.json")):
                self._save_state()

    def cut_link(self, node: int, cut: bool = True) -> None:
        """Take ``node``'s link down (its switch port), as a cable pulled or a switch that
        fails; ``cut=False`` brings it back. Its Ray processes keep running meanwhile."""
        self._check_node(node)
        in_namespace(self.spec.switch, "ip", "link", "set", f"port{node}", "down" if cut else "up")

    def restart_node(self, node: int) -> None:
        """Stop ``node``'s Ray processes (by pid) and start its Ray node again, joined to the
        head: a worker node that the head declared dead (its link was down too long) and came
        back, as a rebooted machine would. Not the head (node 0)."""
        self._check_node(node)
        if node == 0:
            raise ClusterError("the head (node 0) cannot be restarted: take the cluster down and up instead")
        stop_processes_in([self.spec.namespace(node)], STOP_GRACE_S, first=signal.SIGKILL)
        self._start_node(node)
        self._wait_for_nodes()

    def _check_node(self, node: int) -> None:
        if not isinstance(node, int) or not 0 <= node < self.spec.nodes:
            raise ClusterError(f"node must be from 0 to {self.spec.nodes - 1}, got {node!r}")

    def _start_ray(self) -> None:
        for node in range(self.spec.nodes):
            self._start_node(node)
        self._wait_for_nodes()

    def _start_node(self, node: int) -> None:
        spec, ray, env = self.spec, ray_cli(), node_env(self.spec)
        assert ray is not None
        temp_dir = spec.temp_dir(node)
        os.makedirs(temp_dir, exist_ok=True)
        args = [
            ray, "start",
            f"--node-ip-address={spec.address(node)}",
            f"--num-cpus={spec.cpus_per_node}",
            f"--object-store-memory={spec.object_store_mb * 2**20}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if node == 0:
            args += ["--head", f"--port={HEAD_PORT}", "--include-dashboard=false"]
        else:
            args += [f"--address={spec.head_address}"]
        log = os.path.join(spec.state_dir, f"ray-start-n{node}.log")
        with open(log, "w") as out:
            done = subprocess.run(
                ["ip", "netns", "exec", spec.namespace(node), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=RAY_START_TIMEOUT_S,
            )
        if done.returncode != 0:
            with open(log) as f:
                tail = re.sub(r"\x1b\[[0-9;]*m", "", f.read()).strip().splitlines()[-2:]
            raise ClusterError(f"ray start failed on node {node}: {' / '.join(tail)}")
        self._say(f"node {node} up at {spec.address(node)} ({spec.cpus_per_node} CPUs)")

    def _wait_for_nodes(self) -> None:
        """Until the head sees every node alive (a worker node registers shortly after its start)."""
        check = "import ray; ray.init(logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + RAY_START_TIMEOUT_S
        alive = "0"
        while time.monotonic() < deadline:
            done = self.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=RAY_START_TIMEOUT_S)
            if done.returncode == 0 and done.stdout.split() and int(done.stdout.split()[-1]) >= self.spec.nodes:
                return
            alive = done.stdout.split()[-1] if done.stdout.split() else "?"
            time.sleep(0.5)
        raise ClusterError(f"only {alive} of {self.spec.nodes} Ray nodes alive after {RAY_START_TIMEOUT_S:.0f}s")

    # ------------------------------------------------------------------ use

    def run(
        self,
        command: Sequence[str],
        node: int = 0,
        env: Mapping[str, str] | None = None,
        background: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``command`` in ``node``'s namespace, joined to the cluster (RAY_ADDRESS set), as
        ``subprocess.run`` does (``background``: as ``subprocess.Popen``, returned at once);
        ``env`` adds to (or overrides) the cluster's environment."""
        argv = ["ip", "netns", "exec", self.spec.namespace(node), *command]
        full_env = {**node_env(self.spec), **(env or {})}
        if background:
            return subprocess.Popen(argv, env=full_env, **kwargs)
        return subprocess.run(argv, env=full_env, **kwargs)

    def link_bytes(self) -> list[dict[str, int]]:
        """Bytes each node has sent (``tx``) and received (``rx``) on its link so far."""
        counts = []
        for node in range(self.spec.nodes):
            out = sh("ip", "-n", self.spec.namespace(node), "-s", "-j", "link", "show", "dev", NODE_IFACE).stdout
            stats = json.loads(out)[0]["stats64"]
            counts.append({"tx": stats["tx"]["bytes"], "rx": stats["rx"]["bytes"]})
        return counts

    def status(self) -> dict[str, Any]:
        """Namespaces, addresses, the links' shaping as the kernel has it, processes per node."""
        spec, present = self.spec, set(namespaces_of(self.spec.name))
        nodes = []
        for node in range(spec.nodes):
            ns = spec.namespace(node)
            info: dict[str, Any] = {"node": node, "namespace": ns, "address": spec.address(node), "up": ns in present}
            if info["up"]:
                qdisc = in_namespace(ns, "tc", "qdisc", "show", "dev", NODE_IFACE, check=False).stdout
                shaped = re.search(r"tbf .*?rate (\S+)", qdisc)
                info["link"] = shaped.group(1) if shaped else "none"
                info["processes"] = len(namespace_pids(ns))
                info.update(self.link_bytes()[node])
            nodes.append(info)
        return {"name": spec.name, "address": self.address, "spec": asdict(spec), "nodes": nodes}

    # ------------------------------------------------------------------ down

    def down(self) -> None:
        """Stop every process in this cluster's namespaces (by pid), delete the namespaces."""
        names = namespaces_of(self.spec.name)
        stop_processes_in(names, STOP_GRACE_S)
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)
        left = namespaces_of(self.spec.name)
        if left:
            raise ClusterError(f"could not delete namespaces {left} of cluster {self.spec.name!r}")
        shutil.rmtree(self.spec.state_dir, ignore_errors=True)
        if names:
            self._say(f"down: {len(names)} namespace(s) deleted")
