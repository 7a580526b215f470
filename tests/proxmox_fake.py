"""A small HTTPS server speaking the parts of the Proxmox VE API that discovery uses.

Response shapes are PVE's own (``{"data": ...}``; field names, types and tag format as
PVE 8 returns them): ``/cluster/resources`` lists qemu and lxc guests, running and
stopped, with ``;``-separated sorted lower-case tags (absent when a guest has none);
``/nodes/{node}/lxc/{vmid}/interfaces`` lists ``lo`` first and, for a nested Docker,
``docker0`` too, in the current shape (``ip-addresses`` plus the older ``inet`` /
``inet6`` / ``hwaddr``), or only the older fields (PVE 8.1-8.3), or is missing (501, PVE
before 8.1). Every request needs ``Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET``
(401 ``authentication failure`` otherwise).

The paths come from proxmoxer's https backend: ``https://HOST:PORT/api2/json/`` + the
resource path, query parameters as the query string.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.pki import Pki

GIB = 1024**3


def iface(
    name: str, mac: str, addrs: list[tuple[str, str, int]], *, legacy_only: bool = False
) -> dict[str, Any]:
    """An interfaces entry as ``PVE::LXC::get_interfaces`` builds it from ``ip --json a``:
    the older fields hold the last address of each family."""
    entry: dict[str, Any] = {"name": name, "hwaddr": mac}
    for family, address, prefix in addrs:
        entry[family] = f"{address}/{prefix}"
    if not legacy_only:
        entry["hardware-address"] = mac
        entry["ip-addresses"] = [
            {"ip-address-type": family, "ip-address": address, "prefix": prefix}
            for family, address, prefix in addrs
        ]
    return entry


def loopback(legacy_only: bool = False) -> dict[str, Any]:
    return iface(
        "lo", "00:00:00:00:00:00", [("inet", "127.0.0.1", 8), ("inet6", "::1", 128)], legacy_only=legacy_only
    )


@dataclass
class Guest:
    """One guest (LXC container or QEMU VM) of the fake cluster."""

    vmid: int
    name: str
    node: str
    type: str = "lxc"
    status: str = "running"
    tags: str | None = None
    maxcpu: int = 2
    maxmem: int = 2 * GIB
    template: int = 0
    interfaces: list[dict[str, Any]] | None = None
    #: False: the interfaces endpoint does not exist (PVE before 8.1) -> 501.
    interfaces_api: bool = True
    net0: str = "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"

    def resource(self) -> dict[str, Any]:
        running = self.status == "running"
        entry: dict[str, Any] = {
            "id": f"{self.type}/{self.vmid}",
            "type": self.type,
            "vmid": self.vmid,
            "name": self.name,
            "node": self.node,
            "status": self.status,
            "uptime": 86_400 if running else 0,
            "cpu": 0.0123 if running else 0,
            "maxcpu": self.maxcpu,
            "mem": 512 * 1024**2 if running else 0,
            "maxmem": self.maxmem,
            "disk": GIB if running else 0,
            "maxdisk": 8 * GIB,
            "netin": 123_456 if running else 0,
            "netout": 65_432 if running else 0,
            "diskread": 1_000_000 if running else 0,
            "diskwrite": 2_000_000 if running else 0,
            "template": self.template,
        }
        if self.tags is not None:
            entry["tags"] = self.tags
        return entry

    def vmstatus(self, vmid_as_string: bool) -> dict[str, Any]:
        running = self.status == "running"
        entry: dict[str, Any] = {
            "vmid": str(self.vmid) if vmid_as_string else self.vmid,
            "name": self.name,
            "status": self.status,
            "type": self.type,
            "cpus": self.maxcpu,
            "maxmem": self.maxmem,
            "maxswap": 512 * 1024**2,
            "maxdisk": 8 * GIB,
            "mem": 512 * 1024**2 if running else 0,
            "swap": 0,
            "disk": GIB if running else 0,
            "uptime": 86_400 if running else 0,
            "cpu": 0.0123 if running else 0,
            "netin": 0,
            "netout": 0,
            "diskread": 0,
            "diskwrite": 0,
        }
        if running:
            entry["pid"] = 10_000 + self.vmid
        if self.tags is not None:
            entry["tags"] = self.tags
        return entry

    def config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "arch": "amd64",
            "cores": self.maxcpu,
            "features": "keyctl=1,nesting=1",
            "hostname": self.name,
            "memory": self.maxmem // 1024**2,
            "net0": self.net0,
            "ostype": "debian",
            "rootfs": f"local-lvm:vm-{self.vmid}-disk-0,size=8G",
            "swap": 512,
            "unprivileged": 1,
            "digest": f"{self.vmid:040x}",
        }
        if self.tags is not None:
            conf["tags"] = self.tags
        return conf


def default_guests() -> list[Guest]:
    """A mixed cluster: tagged and untagged, running and stopped, qemu and lxc."""
    return [
        Guest(100, "vm-trainer", "pve1", type="qemu", tags="ktrdr-worker", maxcpu=8, maxmem=32 * GIB),
        Guest(
            101,
            "worker-a",
            "pve1",
            tags="gpu;ktrdr-worker",
            maxcpu=4,
            maxmem=8 * GIB,
            interfaces=[
                loopback(),
                iface(
                    "eth0",
                    "bc:24:11:00:01:01",
                    [("inet", "10.10.0.101", 24), ("inet6", "fe80::be24:11ff:fe00:101", 64)],
                ),
                iface("docker0", "02:42:ac:11:00:01", [("inet", "172.17.0.1", 16)]),
            ],
        ),
        Guest(
            102,
            "worker-v6",
            "pve2",
            tags="ktrdr-worker",
            maxcpu=2,
            maxmem=4 * GIB,
            interfaces=[
                loopback(),
                iface(
                    "eth0",
                    "bc:24:11:00:01:02",
                    [("inet6", "fe80::be24:11ff:fe00:102", 64), ("inet6", "2001:db8::102", 64)],
                ),
            ],
        ),
        Guest(
            103, "worker-stopped", "pve1", status="stopped", tags="ktrdr-worker", maxcpu=8, maxmem=16 * GIB
        ),
        Guest(
            104,
            "db",
            "pve1",
            interfaces=[loopback(), iface("eth0", "bc:24:11:00:01:04", [("inet", "10.10.0.104", 24)])],
        ),
        Guest(
            105,
            "web",
            "pve2",
            tags="monitoring;web",
            interfaces=[loopback(), iface("eth0", "bc:24:11:00:01:05", [("inet", "10.10.0.105", 24)])],
        ),
        Guest(
            106,
            "worker-old-pve",
            "pve2",
            tags="ktrdr-worker",
            maxcpu=6,
            maxmem=12 * GIB,
            interfaces_api=False,
            net0="name=eth0,bridge=vmbr0,gw=10.10.0.1,hwaddr=BC:24:11:00:01:06,ip=10.10.0.106/24,type=veth",
        ),
        Guest(107, "ct-template", "pve1", status="stopped", tags="ktrdr-worker", template=1),
        Guest(
            108,
            "worker-legacy",
            "pve1",
            tags="ktrdr-worker;zz-extra",
            maxcpu=3,
            maxmem=6 * GIB,
            interfaces=[
                loopback(legacy_only=True),
                iface(
                    "eth0",
                    "bc:24:11:00:01:08",
                    [("inet", "10.10.0.108", 24), ("inet6", "fe80::be24:11ff:fe00:108", 64)],
                    legacy_only=True,
                ),
            ],
        ),
        Guest(110, "vm-stopped", "pve2", type="qemu", status="stopped"),
    ]


@dataclass
class FakeProxmox:
    """The fake API server; ``start()`` it, point proxmoxer at ``host``/``port``."""

    directory: Path
    user: str = "ktrdr@pve"
    token_name: str = "discovery"
    token_value: str = "5f0c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f"
    guests: list[Guest] = field(default_factory=default_guests)
    nodes: tuple[str, ...] = ("pve1", "pve2")
    #: Nodes that return ``vmid`` as a string from /nodes/{node}/lxc (older PVE).
    string_vmid_nodes: tuple[str, ...] = ("pve2",)
    requests: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    ca_file: str = ""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> FakeProxmox:
        pki = Pki(self.directory, name="pve")
        cert, key = pki.issue("pve-api", server=True, ips=("127.0.0.1",), dns=("localhost",))
        self.ca_file = str(pki.ca_path)
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-pve"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def authorization(self) -> str:
        return f"PVEAPIToken={self.user}!{self.token_name}={self.token_value}"

    # -- request handling ---------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append(f"GET {parts.path}" + (f"?{parts.query}" if parts.query else ""))
        if handler.headers.get("Authorization") != self.authorization:
            self._send(handler, 401, None, reason="authentication failure")
            return
        prefix = "/api2/json"
        if not parts.path.startswith(prefix + "/"):
            self._send(handler, 501, None, reason=f"Method 'GET {parts.path}' not implemented")
            return
        segments = [s for s in parts.path[len(prefix) :].split("/") if s]
        status, data, reason = self._route(segments, query)
        self._send(handler, status, data, reason=reason)

    def _guest(self, node: str, vmid: str) -> Guest | None:
        for guest in self.guests:
            if guest.type == "lxc" and str(guest.vmid) == vmid and guest.node == node:
                return guest
        return None

    def _route(self, seg: list[str], query: dict[str, str]) -> tuple[int, Any, str]:
        path = "/" + "/".join(seg)
        not_implemented = (501, None, f"Method 'GET {path}' not implemented")
        if seg == ["cluster", "resources"]:
            kind = query.get("type")
            items = [g.resource() for g in self.guests] if kind in (None, "vm") else []
            if kind is None:
                items += [
                    {"id": f"node/{n}", "type": "node", "node": n, "status": "online"} for n in self.nodes
                ]
            return 200, items, "OK"
        if seg == ["nodes"]:
            return 200, [self._node(n) for n in self.nodes], "OK"
        if len(seg) >= 3 and seg[0] == "nodes" and seg[2] == "lxc":
            node = seg[1]
            if node not in self.nodes:
                return 595, None, f"no such cluster node '{node}'"
            if len(seg) == 3:
                as_string = node in self.string_vmid_nodes
                lxcs = [g.vmstatus(as_string) for g in self.guests if g.type == "lxc" and g.node == node]
                return 200, lxcs, "OK"
            guest = self._guest(node, seg[3])
            if guest is None:
                return 500, None, f"Configuration file 'nodes/{node}/lxc/{seg[3]}.conf' does not exist"
            rest = seg[4:]
            if rest == ["config"]:
                return 200, guest.config(), "OK"
            if rest == ["status", "current"]:
                status = guest.vmstatus(False)
                status["ha"] = {"managed": 0}
                return 200, status, "OK"
            if rest == ["interfaces"]:
                if not guest.interfaces_api:
                    return not_implemented
                return 200, (guest.interfaces if guest.status == "running" else None), "OK"
        return not_implemented

    def _node(self, node: str) -> dict[str, Any]:
        return {
            "node": node,
            "status": "online",
            "type": "node",
            "id": f"node/{node}",
            "cpu": 0.05,
            "maxcpu": 16,
            "mem": 8 * GIB,
            "maxmem": 64 * GIB,
            "disk": 20 * GIB,
            "maxdisk": 100 * GIB,
            "uptime": 1_000_000,
            "level": "",
            "ssl_fingerprint": "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
        }

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: Any, *, reason: str) -> None:
        body = json.dumps({"data": data}).encode()
        handler.send_response(status, reason)
        handler.send_header("Content-Type", "application/json;charset=UTF-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "max-age=0")
        handler.end_headers()
        handler.wfile.write(body)
