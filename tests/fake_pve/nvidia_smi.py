#!/usr/bin/env python3
"""A recording fake of the host's ``nvidia-smi`` (NVIDIA's driver tool), from the state's
``host_gpu``: ``{works, driver, gpus: [{name, memory_mib}]}``.

Implemented: no arguments (a short summary), ``-L`` (``GPU i: NAME (UUID: ...)``), and
``--query-gpu=FIELDS --format=csv,noheader[,nounits]`` with the fields index, name,
memory.total, driver_version, uuid. With ``works`` false it fails as nvidia-smi does
when the driver is not loaded (exit 9). Anything else fails loudly (exit 97).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate
from pvestate import unsupported

PROG = "nvidia-smi"
FIELDS = ("index", "name", "memory.total", "driver_version", "uuid")


def value(field: str, index: int, gpu: dict[str, Any], host: dict[str, Any], units: bool) -> str:
    if field == "index":
        return str(index)
    if field == "name":
        return str(gpu["name"])
    if field == "memory.total":
        return f"{gpu['memory_mib']} MiB" if units else str(gpu["memory_mib"])
    if field == "driver_version":
        return str(host["driver"])
    return f"GPU-{index:08d}-0000-0000-0000-000000000000"


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    with pvestate.locked() as state:
        host = state["host_gpu"]
    if not host.get("works", True):
        print(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.",
            file=sys.stderr,
        )
        return 9
    gpus = host.get("gpus", [])
    if not argv:
        print(f"| NVIDIA-SMI {host['driver']}   Driver Version: {host['driver']} |")
        for i, gpu in enumerate(gpus):
            print(f"|   {i}  {gpu['name']}  {gpu['memory_mib']}MiB |")
        return 0
    if argv == ["-L"]:
        for i, gpu in enumerate(gpus):
            print(f"GPU {i}: {gpu['name']} (UUID: {value('uuid', i, gpu, host, True)})")
        return 0
    query = [a for a in argv if a.startswith("--query-gpu=")]
    fmt = [a for a in argv if a.startswith("--format=")]
    if len(query) == 1 and len(fmt) == 1 and len(argv) == 2:
        fields = query[0].split("=", 1)[1].split(",")
        flags = fmt[0].split("=", 1)[1].split(",")
        if (
            any(f not in FIELDS for f in fields)
            or "csv" not in flags
            or not set(flags) <= {"csv", "noheader", "nounits"}
        ):
            unsupported(
                PROG, " ".join(argv), f"--query-gpu={','.join(FIELDS)} --format=csv[,noheader][,nounits]"
            )
        if "noheader" not in flags:
            print(", ".join(fields))
        for i, gpu in enumerate(gpus):
            print(", ".join(value(f, i, gpu, host, "nounits" not in flags) for f in fields))
        return 0
    unsupported(PROG, " ".join(argv), "(no arguments), -L, --query-gpu=... --format=csv,...")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
