"""A recording fake of a Proxmox VE node's command line, for the scripts in images/lxc/.

:class:`FakePve` makes a directory with the state (``state.json``, see ``pvestate``), the
call log (``calls.jsonl``), the containers' config files (``lxc/``, the node's
/etc/pve/lxc) and a ``bin/`` put first on PATH with ``pct``, ``pvesh``, ``pveam`` (and,
on request, the host's ``nvidia-smi``): each a small wrapper running the Python fake of
the same name here with the test's interpreter. Each fake's docstring says what real
command it stands for and what it implements; anything else fails loudly (exit 97).
``ktrdr-run`` and the TLS check are recording stubs too (``KTRDR_RUN``,
``KTRDR_TLS_CHECK``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fake_pve import pvestate

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FAKES = {
    "pct": "pct.py",
    "pvesh": "pvesh.py",
    "pveam": "pveam.py",
    "ktrdr-run": "ktrdr_run_stub.py",
    "tls-check": "tls_check_stub.py",
}


def is_read_only(call: list[str]) -> bool:
    """Whether a recorded call only reads (what --dry-run may still make)."""
    sub = call[1] if len(call) > 1 else ""
    return (
        (call[0] == "pvesh" and sub == "get")
        or (call[0] == "pveam" and sub == "list")
        or (call[0] == "pct" and sub in ("status", "config"))
        or call[0] == "nvidia-smi"
    )


class FakePve:
    """One fake node (``pve1`` by default) in ``root``."""

    def __init__(self, root: Path, *, node: str = "pve1", gpu: bool = False) -> None:
        self.root = root
        self.node = node
        self.state_file = root / "state.json"
        self.log = root / "calls.jsonl"
        self.lxc_dir = root / "lxc"
        self.bin = root / "bin"
        self.tmp = root / "tmp"
        for path in (self.lxc_dir, self.bin, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(pvestate.default_state(node), indent=1))
        self.log.write_text("")
        for name, script in FAKES.items():
            self._wrapper(name, script)
        if gpu:
            self._wrapper("nvidia-smi", "nvidia_smi.py")

    def _wrapper(self, name: str, script: str) -> None:
        path = self.bin / name
        # -S: the fakes need only the standard library (and start sooner without site)
        python, fake = shlex.quote(sys.executable), shlex.quote(str(HERE / script))
        path.write_text(f'#!/bin/sh\nexec {python} -S {fake} "$@"\n')
        path.chmod(0o755)

    # --- state -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def save(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def guest(self, vmid: int) -> dict[str, Any]:
        return self.state()["guests"][str(vmid)]

    def add_guest(
        self,
        vmid: int,
        *,
        type: str = "lxc",
        node: str | None = None,
        status: str = "running",
        template: int = 0,
        tags: list[str] | None = None,
        hostname: str = "",
        packages: list[str] | None = None,
    ) -> None:
        """A guest that exists before the script runs (its config file too, for an lxc on this node)."""
        state = self.state()
        guest = {
            "type": type,
            "node": node or self.node,
            "status": status,
            "template": template,
            "config": {
                "hostname": hostname or f"{type}{vmid}",
                "cores": "2",
                "memory": "2048",
                "net0": "name=eth0,bridge=vmbr0,ip=dhcp",
            },
            "tags": tags or [],
            "pushed": {},
            "packages": packages or [],
            "images": [],
            "ip": f"10.10.{(vmid >> 8) & 255}.{vmid & 255}" if status == "running" else "",
            "docker": {"active": status == "running" and "docker.io" in (packages or [])},
        }
        if node and node not in state["nodes"]:
            state["nodes"].append(node)
        state["guests"][str(vmid)] = guest
        self.save(state)
        if type == "lxc" and guest["node"] == self.node:
            os.environ["FAKE_PVE_STATE"] = str(self.state_file)
            try:
                pvestate.write_conf(str(vmid), guest)
            finally:
                del os.environ["FAKE_PVE_STATE"]

    # --- calls -----------------------------------------------------------------------

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def clear_calls(self) -> None:
        self.log.write_text("")

    def changing_calls(self) -> list[list[str]]:
        """Calls other than read-only queries (pvesh get, pveam list, pct status/config, nvidia-smi)."""
        return [c for c in self.calls() if not is_read_only(c)]

    # --- running a script ------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KTRDR_", "PVE_", "NVIDIA_", "FAKE_PVE", "DOCKER_"))
        }
        env.update(
            PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}",
            FAKE_PVE_STATE=str(self.state_file),
            PVE_NODE=self.node,
            PVE_LXC_DIR=str(self.lxc_dir),
            KTRDR_RUN=str(self.bin / "ktrdr-run"),
            KTRDR_TLS_CHECK=str(self.bin / "tls-check"),
            KTRDR_POLL_S="0.05",
            TMPDIR=str(self.tmp),
            HOME=str(self.root),
        )
        env.update(extra)
        return env

    def run(
        self, script: str, *args: str, stdin: str | None = None, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``images/<script>`` with this node's commands first on PATH."""
        return subprocess.run(
            ["bash", str(REPO / "images" / script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(**env),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
