#!/usr/bin/env python3
"""A recording fake of Proxmox VE's ``pvesh`` (the API on the command line).

Only ``get`` with ``--output-format json`` (or ``json-pretty``), on:

- ``/cluster/resources [--type vm|node|storage]``  guests (lxc and qemu, every node,
  running and stopped, ``template`` 0/1, ``tags`` ``;``-separated and absent when a
  guest has none), nodes and storages, shaped as PVE 8 returns them
- ``/nodes``                                        the cluster's nodes
- ``/nodes/{node}/storage [--content C]``           the storages enabled on that node
- ``/nodes/{node}/network [--type T]``              its interfaces (bridges and a NIC)

An unknown node fails as the real one does (hostname lookup); any other verb, path,
option or output format fails loudly (exit 97).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate
from pvestate import die, unsupported

PROG = "pvesh"
PATHS = "/cluster/resources, /nodes, /nodes/{node}/storage, /nodes/{node}/network"
GIB = 1024**3


def guest_resource(vmid: str, guest: dict[str, Any]) -> dict[str, Any]:
    running = guest["status"] == "running"
    config = guest.get("config", {})
    entry: dict[str, Any] = {
        "id": f"{guest['type']}/{vmid}",
        "type": guest["type"],
        "vmid": int(vmid),
        "name": config.get("hostname", config.get("name", f"{guest['type']}{vmid}")),
        "node": guest["node"],
        "status": guest["status"],
        "template": int(guest.get("template", 0)),
        "maxcpu": int(config.get("cores", 1)),
        "maxmem": int(config.get("memory", 512)) * 1024**2,
        "maxdisk": 8 * GIB,
        "uptime": 3600 if running else 0,
        "cpu": 0.01 if running else 0,
        "mem": 256 * 1024**2 if running else 0,
        "disk": GIB if running else 0,
    }
    if guest.get("tags"):
        entry["tags"] = ";".join(guest["tags"])
    return entry


def storages_of(state: dict[str, Any], node: str) -> list[dict[str, Any]]:
    out = []
    for name, store in sorted(state["storages"].items()):
        if store.get("nodes") and node not in store["nodes"]:
            continue
        out.append(
            {
                "storage": name,
                "type": store["type"],
                "content": store["content"],
                "active": store.get("active", 1),
                "enabled": store.get("enabled", 1),
                "shared": 0,
                "total": 100 * GIB,
                "used": 10 * GIB,
                "avail": 90 * GIB,
            }
        )
    return out


def options(args: list[str], allowed: set[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or key[2:] not in allowed | {"output-format"}:
            unsupported(
                PROG, f"option {key!r}", " ".join(f"--{a}" for a in sorted(allowed | {"output-format"}))
            )
        if i + 1 >= len(args):
            die(PROG, f"400 not enough arguments: {key} needs a value")
        opts[key[2:]] = args[i + 1]
        i += 2
    fmt = opts.pop("output-format", "text")
    if fmt not in ("json", "json-pretty"):
        unsupported(PROG, f"--output-format {fmt}", "--output-format json|json-pretty")
    return opts


def check_node(state: dict[str, Any], node: str) -> None:
    if node not in state["nodes"]:
        die(
            PROG,
            f"hostname lookup '{node}' failed - failed to get address info for: {node}: "
            "Name or service not known",
        )


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    if len(argv) < 2 or argv[0] != "get":
        unsupported(PROG, f"'{' '.join(argv[:1]) or '(nothing)'}'", "get PATH --output-format json")
    path, rest = argv[1].rstrip("/"), argv[2:]
    parts = path.strip("/").split("/")
    with pvestate.locked() as state:
        if path == "/cluster/resources":
            opts = options(rest, {"type"})
            kind = opts.get("type", "")
            if kind not in ("", "vm", "node", "storage"):
                die(
                    PROG,
                    f"400 Parameter verification failed.\ntype: value '{kind}' does not have a value "
                    "in the enumeration 'vm, storage, node, sdn'",
                )
            data: list[dict[str, Any]] = []
            if kind in ("", "node"):
                data += [
                    {"id": f"node/{n}", "type": "node", "node": n, "status": "online", "maxcpu": 32}
                    for n in state["nodes"]
                ]
            if kind in ("", "storage"):
                for n in state["nodes"]:
                    data += [
                        {
                            "id": f"storage/{n}/{s['storage']}",
                            "type": "storage",
                            "node": n,
                            "storage": s["storage"],
                            "status": "available",
                            "content": s["content"],
                            "plugintype": s["type"],
                        }
                        for s in storages_of(state, n)
                    ]
            if kind in ("", "vm"):
                data += [
                    guest_resource(vmid, g)
                    for vmid, g in sorted(state["guests"].items(), key=lambda i: int(i[0]))
                ]
        elif path == "/nodes":
            options(rest, set())
            data = [{"node": n, "status": "online", "type": "node"} for n in state["nodes"]]
        elif len(parts) == 3 and parts[0] == "nodes" and parts[2] == "storage":
            opts = options(rest, {"content"})
            check_node(state, parts[1])
            data = storages_of(state, parts[1])
            if "content" in opts:
                data = [s for s in data if opts["content"] in s["content"].split(",")]
        elif len(parts) == 3 and parts[0] == "nodes" and parts[2] == "network":
            opts = options(rest, {"type"})
            check_node(state, parts[1])
            data = [{"iface": "eno1", "type": "eth", "active": 1}]
            data += [
                {"iface": b, "type": "bridge", "active": 1, "autostart": 1, "bridge_ports": "eno1"}
                for b in state["bridges"].get(parts[1], [])
            ]
            if "type" in opts:
                data = [i for i in data if i["type"] == opts["type"]]
        else:
            unsupported(PROG, f"get {path}", PATHS)
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
