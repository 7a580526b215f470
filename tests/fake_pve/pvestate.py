"""The state every fake command of :mod:`tests.fake_pve` shares: one JSON file, locked
while a command reads or changes it, and a log of every call (one JSON argv per line).

``FAKE_PVE_STATE`` names the state file; the call log (``calls.jsonl``) and the
containers' config files (``lxc/<vmid>.conf``, as Proxmox keeps them in /etc/pve/lxc)
are next to it. The state's shape (see :func:`default_state`)::

    node            this node's name
    nodes           every node of the cluster
    storages        name -> {type, content, active, enabled, nodes}
    ostemplates     storage -> [file names under <storage>:vztmpl/]
    bridges         node -> [bridge names]
    guests          vmid (str) -> {type lxc|qemu, node, status running|stopped, template
                    0|1, config {key: value}, tags [..], pushed {path: {sha256, perms,
                    text}}, packages [..], images [..], ip, docker {...}, gpu {...}}
    host_gpu        what the host's nvidia-smi says: {works, driver, gpus [{name, memory_mib}]}
    tls             the TLS check stub's knobs: {fail_times {address: n}, never}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

TEXT_LIMIT = 64 * 1024


def default_state(node: str = "pve1") -> dict[str, Any]:
    return {
        "node": node,
        "nodes": [node],
        "storages": {
            "local": {"type": "dir", "content": "backup,iso,vztmpl", "active": 1, "enabled": 1},
            "local-lvm": {"type": "lvmthin", "content": "images,rootdir", "active": 1, "enabled": 1},
        },
        "ostemplates": {
            "local": ["debian-11-standard_11.7-1_amd64.tar.zst", "debian-12-standard_12.7-1_amd64.tar.zst"]
        },
        "bridges": {node: ["vmbr0"]},
        "guests": {},
        "host_gpu": {
            "works": True,
            "driver": "550.54.15",
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}],
        },
        "tls": {"fail_times": {}, "never": False},
    }


def state_path() -> Path:
    path = os.environ.get("FAKE_PVE_STATE")
    if not path:
        die("fake", "FAKE_PVE_STATE is not set: the fake Proxmox commands keep their state there", 96)
    return Path(path)


def die(prog: str, message: str, code: int = 255) -> NoReturn:
    print(f"{message}", file=sys.stderr)
    sys.exit(code)


def unsupported(prog: str, what: str, implemented: str) -> NoReturn:
    """Fail loudly: a call the fake does not implement (exit 97, so no script mistakes it
    for a real answer)."""
    print(
        f"fake {prog}: {what} is not implemented by the fake (it implements: {implemented})", file=sys.stderr
    )
    sys.exit(97)


@contextlib.contextmanager
def locked() -> Iterator[dict[str, Any]]:
    """The state, for reading and changing; written back when the block ends normally."""
    path = state_path()
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text())
        before = json.dumps(state, sort_keys=True)
        yield state
        if json.dumps(state, sort_keys=True) != before:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
            tmp.replace(path)


def record(prog: str, args: list[str]) -> None:
    """Append ``[prog, *args]`` to the call log."""
    path = state_path().with_name("calls.jsonl")
    with open(path, "a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        log.write(json.dumps([prog, *args]) + "\n")


def file_record(source: Path, perms: str) -> dict[str, Any]:
    data = source.read_bytes()
    entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "perms": perms}
    if len(data) <= TEXT_LIMIT:
        with contextlib.suppress(UnicodeDecodeError):
            entry["text"] = data.decode()
    return entry


CONF_KEYS = (
    "arch",
    "cores",
    "description",
    "features",
    "hostname",
    "memory",
    "net0",
    "onboot",
    "ostype",
    "rootfs",
    "swap",
    "tags",
    "template",
    "unprivileged",
)


def conf_path(vmid: str) -> Path:
    return state_path().with_name("lxc") / f"{vmid}.conf"


def write_conf(vmid: str, guest: dict[str, Any]) -> None:
    """Rewrite ``lxc/<vmid>.conf`` from the guest's config as Proxmox does (``key: value``,
    sorted), keeping the raw ``lxc.*`` lines and any ``[snapshot]`` sections already there."""
    path = conf_path(vmid)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw: list[str] = []
    sections: list[str] = []
    if path.exists():
        in_sections = False
        for line in path.read_text().splitlines():
            in_sections = in_sections or line.startswith("[")
            if in_sections:
                sections.append(line)
            elif line.startswith("lxc."):
                raw.append(line)
    config = dict(guest["config"])
    if guest.get("tags"):
        config["tags"] = ";".join(guest["tags"])
    if guest.get("template"):
        config["template"] = "1"
    lines = [f"{key}: {config[key]}" for key in sorted(config) if key in CONF_KEYS]
    text = "\n".join(lines + raw) + "\n"
    if sections:
        text += "\n" + "\n".join(sections) + "\n"
    path.write_text(text)


def remove_conf(vmid: str) -> None:
    conf_path(vmid).unlink(missing_ok=True)
