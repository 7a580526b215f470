"""A 3-node JetStream cluster of real nats-server processes on this machine, for tests.

Each node has its own random client, cluster and monitoring ports and its own store
directory; the configurations come from :meth:`Authority.cluster_node_configs` (the code
behind ``ktrdr-run nats config --cluster``), so operator mode, ``sync_interval: always``
and ``no_advertise`` are what the tests run. Clients listen on 0.0.0.0, so containers on
the runners' network reach them at its gateway; routes and monitoring on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import RawCredentials

from dispatcher.authority import Authority, ClusterNode
from dispatcher.embedded import free_port, nats_server_binary


class Node:
    """One nats-server process of the cluster."""

    def __init__(self, spec: ClusterNode, workdir: Path) -> None:
        self.spec = spec
        self.conf = workdir / f"{spec.name}.conf"
        self.log_path = workdir / f"{spec.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        """Its client URL from this machine."""
        return f"nats://127.0.0.1:{self.spec.client_port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye to the other nodes."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it hangs."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def monitor(self, path: str, timeout_s: float = 2.0) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``/jsz``, ``/healthz``...). Blocking."""
        url = f"http://127.0.0.1:{self.spec.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return dict(json.loads(response.read()))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class NatsCluster:
    """``size`` nats-server processes forming one JetStream cluster."""

    def __init__(self, authority: Authority, workdir: Path, size: int = 3) -> None:
        self.authority = authority
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        specs = [
            ClusterNode(
                name=f"node-{i + 1}",
                route_host="127.0.0.1",
                store_dir=str(workdir / f"node-{i + 1}" / "jetstream"),
                listen_host="0.0.0.0",
                client_port=free_port(),
                cluster_listen_host="127.0.0.1",
                cluster_port=free_port(),
                http_port=free_port(),
            )
            for i in range(size)
        ]
        self.nodes = [Node(spec, workdir) for spec in specs]
        for node, text in zip(self.nodes, authority.cluster_node_configs(specs), strict=True):
            node.conf.write_text(text)
            node.conf.chmod(0o600)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what ``[nats] url`` takes."""
        return ",".join(node.url for node in self.nodes)

    def creds(self, name: str) -> RawCredentials:
        """Dispatcher-role credentials of the cluster's deployment."""
        return RawCredentials(self.authority.mint("dispatcher", name))

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start every node and wait until JetStream has a meta leader and every node is
        healthy (``/healthz?js-enabled-only=true`` answers ok)."""
        for node in self.nodes:
            node.start()
        await self.wait_healthy(self.nodes, timeout_s)

    async def wait_healthy(self, nodes: list[Node], timeout_s: float) -> None:
        """Until each of ``nodes`` reports itself healthy and a meta leader is known."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [node.name for node in nodes if not node.alive()]
            if dead:
                raise RuntimeError(f"nats-server {dead} exited:\n{self.node(dead[0]).log_tail()}")
            healthy = [await asyncio.to_thread(_healthy, node) for node in nodes]
            if all(healthy) and await self.meta_leader() and all([await self._answers(n) for n in nodes]):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.name}\n{n.log_tail(1500)}" for n in nodes)
                raise RuntimeError(f"the cluster is not healthy within {timeout_s}s:\n{tails}")
            await asyncio.sleep(0.1)

    async def _answers(self, node: Node) -> bool:
        """Whether JetStream's API answers a client of ``node`` (a meta leader that every
        node knows of)."""
        try:
            nc = await nats.connect(
                node.url, user_credentials=self.creds("ready"), connect_timeout=1, allow_reconnect=False
            )
        except (OSError, nats.errors.Error):
            return False
        try:
            await nc.jetstream(timeout=2).account_info()
            return True
        except (OSError, nats.errors.Error):
            return False
        finally:
            await nc.close()

    async def meta_leader(self) -> str:
        """The JetStream meta leader's server name, as a live node reports it ("" = none)."""
        for node in self.nodes:
            if not node.alive():
                continue
            with contextlib.suppress(OSError, ValueError):
                jsz = await asyncio.to_thread(node.monitor, "/jsz")
                leader = str((jsz.get("meta_cluster") or {}).get("leader") or "")
                if leader:
                    return leader
        return ""

    def stop(self) -> None:
        """Stop every node (the tests' cleanup)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


def _healthy(node: Node) -> bool:
    try:
        return node.monitor("/healthz?js-enabled-only=true").get("status") == "ok"
    except (OSError, ValueError):
        return False


def stream_states(node: Node) -> dict[str, dict[str, Any]]:
    """Every stream of every account that ``node`` holds a replica of: name -> its
    ``state`` (messages, last_seq...), from its monitoring endpoint. Blocking."""
    jsz = node.monitor("/jsz?accounts=true&streams=true")
    out: dict[str, dict[str, Any]] = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            out[str(stream["name"])] = dict(stream.get("state") or {})
    return out


def client_names(node: Node) -> list[str]:
    """The names of the clients connected to ``node`` now. Blocking."""
    connz = node.monitor("/connz?limit=4096")
    return [str(conn.get("name") or "") for conn in connz.get("connections") or []]
