"""``probe``: report what the container actually got.

Operators run it to check a host: CPUs and the CPU quota, the memory and pids limits,
the user, whether the root filesystem is read-only, capabilities, no-new-privileges and
the GPUs visible. With ``hold_s`` it stays running that long, reporting progress and
honouring cancel, to test cancellation and failover on a host. ``allocate_mb`` writes
that much memory (to check the memory limit), ``ignore_cancel`` makes it deaf to cancel
(to check forced kills), ``fail`` / ``exit_code`` make it fail. ``check_isolation`` tries
what the op's container must not be able to do (``runner.isolation``) and reports each
check as ``isolation`` (denied / allowed / unknown) with ``isolation_notes``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

from msgspec import Meta, Struct

from runner.protocol import Resources
from runner.registry import operation
from runner.sdk import OpContext

_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


class ProbeParams(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``probe``."""

    hold_s: Annotated[float, Meta(ge=0, le=86_400)] = 0.0
    tick_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    fail: bool = False
    exit_code: Annotated[int, Meta(ge=0, le=255)] = 0
    allocate_mb: Annotated[int, Meta(ge=0, le=1_048_576)] = 0
    ignore_cancel: bool = False
    check_isolation: bool = False


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cgroup_value(v2_file: str, v1_file: str) -> str | None:
    value = _read(f"/sys/fs/cgroup/{v2_file}")
    return value if value is not None else _read(f"/sys/fs/cgroup/{v1_file}")


def cpu_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota, or None when unlimited."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota_us = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or _read(
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"
    )
    period_us = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") or _read(
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"
    )
    if quota_us is None or period_us is None or int(quota_us) <= 0:
        return None
    return int(quota_us) / int(period_us)


def memory_limit_bytes() -> int | None:
    """The cgroup memory limit in bytes, or None when unlimited."""
    value = _cgroup_value("memory.max", "memory/memory.limit_in_bytes")
    if value is None or value == "max" or int(value) >= _UNLIMITED:
        return None
    return int(value)


def pids_limit() -> int | None:
    """The cgroup pids limit, or None when unlimited."""
    value = _cgroup_value("pids.max", "pids/pids.max")
    return None if value in (None, "max") else int(value)


def root_read_only() -> bool:
    """Whether ``/`` is mounted read-only (checked by trying to write, then by mounts)."""
    try:
        probe = Path("/.ktrdr-probe-write")
        probe.write_bytes(b"")
        probe.unlink()
        return False
    except OSError:
        pass
    for line in (_read("/proc/self/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "/":
            return "ro" in fields[3].split(",")
    return True


def _status_field(name: str) -> str | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def gpus_visible() -> list[str]:
    """GPUs this container can see: ``nvidia-smi -L`` lines, else /dev/nvidiaN nodes."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if lines:
                return lines
        except (OSError, subprocess.SubprocessError):
            pass
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def tmp_writable(scratch: Path) -> bool:
    """Whether the scratch directory accepts writes."""
    try:
        target = scratch / ".ktrdr-probe"
        target.write_bytes(b"x")
        target.unlink()
        return True
    except OSError:
        return False


def inspect_container(scratch: Path) -> dict[str, Any]:
    """Everything ``probe`` reports, as JSON-ready builtins."""
    cap_eff = _status_field("CapEff") or ""
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "non_root": os.getuid() != 0,
        "read_only_root": root_read_only(),
        "scratch_writable": tmp_writable(scratch),
        "cpus_visible": len(os.sched_getaffinity(0)),
        "cpu_quota": cpu_quota(),
        "memory_limit_bytes": memory_limit_bytes(),
        "pids_limit": pids_limit(),
        "capabilities_effective": cap_eff,
        "no_capabilities": bool(cap_eff) and int(cap_eff, 16) == 0,
        "no_new_privileges": _status_field("NoNewPrivs") == "1",
        "gpus": gpus_visible(),
        "nvidia_visible_devices": os.environ.get("NVIDIA_VISIBLE_DEVICES", ""),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


@operation("probe", params=ProbeParams, gpu="never", resources=Resources(cpus=0.5, memory_gb=0.5, gpus=0))
def probe(ctx: OpContext, params: ProbeParams) -> dict[str, Any]:
    """Report what the container got; optionally hold, reporting progress."""
    report = inspect_container(ctx.scratch_dir)
    ctx.progress(0.0, "inspected container", step="inspect")
    ctx.log(f"probe: uid={report['uid']} read_only_root={report['read_only_root']}")
    if params.allocate_mb:
        ctx.log(f"probe: allocating {params.allocate_mb} MiB")
        blob = b"\x01" * (params.allocate_mb * 1024 * 1024)  # every page written
        report["allocated_mb"] = len(blob) // (1024 * 1024)
        del blob
    if params.check_isolation:
        ctx.progress(0.0, "checking isolation", step="isolation")
        report.update(ctx.check_isolation())
        allowed = sorted(name for name, verdict in report["isolation"].items() if verdict == "allowed")
        ctx.log(f"probe: isolation {report['isolation']}" + (f"; ALLOWED: {allowed}" if allowed else ""))
    if params.hold_s > 0:
        ticks = max(1, round(params.hold_s / params.tick_s))
        for tick in range(1, ticks + 1):
            if params.ignore_cancel:  # a runner that never honours cancel (to test forced kills)
                time.sleep(params.hold_s / ticks)
            else:
                ctx.sleep(params.hold_s / ticks)
            ctx.progress(100.0 * tick / ticks, f"holding {tick}/{ticks}", step="hold", tick=tick)
    if params.fail:
        raise RuntimeError("probe asked to fail (fail=true)")
    if params.exit_code:
        ctx.log(f"probe exiting with code {params.exit_code} as asked")
        raise SystemExit(params.exit_code)
    ctx.progress(100.0, "done", step="done")
    return report
