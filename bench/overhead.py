"""Dispatch overhead: `probe` ops through ktrdr-run vs a raw `docker run --rm`, to the same end.

Both sides run the same image and the same probe code, with the same hardening flags:
ours through the whole path (publish the job → dispatcher → hardened container →
runner over JetStream → terminal status seen by the client → container removed by the
dispatcher), the reference as `docker run --rm IMAGE --stdout probe`, which prints the
result instead of publishing it.

The endpoint both sides share: **the op's outcome is known to the client AND its
container has been removed.** Each side is timed from the moment it is asked to run
(job published / `docker run` started) to that point:

- raw: the `docker run --rm` process exits; with `--rm` the CLI waits until the engine
  has removed the container, and it has printed the probe's result by then (checked
  afterwards, untimed: docker has no container of that name);
- ktrdr-run: the later of (a) the op's terminal status event reaching the client and
  (b) the client receiving the engine's `destroy` event for the op's container, once
  docker lists no container labelled `ktrdr.op_id=<op id>` (checked untimed when the
  event arrives; without an event docker is asked every 0.5 s, up to 30 s).

Runs alternate, so both see the same machine state. Prints both medians and the ratio;
submit-to-terminal-status of ours (the endpoint before container removal, not compared)
is printed too.

Twice by default: with the warm pool off (every op creates and starts its container) and
on (``[[pool.shapes]]`` of the probe's shape: the op takes a container that was created,
started and did its imports before the op was submitted). With the pool on, each timed
run (either side) starts once the pool is quiet (nothing warming), so the replacement
warming in the background never competes with the run being timed; its cost shows in
``bench/throughput.py``.

    python bench/overhead.py [--runs 20] [--pool both|on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid

from harness import RemovalWatcher, Stack, bench_stack, percentile, run

from dispatcher.config import DispatcherConfig, PoolConfig, PoolShape
from dispatcher.engine import RUNNER_USER
from ktrdr_run.session import Session
from runner.protocol import Job, Resources, StatusEvent

CPUS, MEMORY_GB, PIDS = 0.5, 0.5, 512
REMOVAL_TIMEOUT_S = 30.0


def raw_docker_run(image: str) -> float:
    """One `docker run --rm` of the probe, hardened the same way; returns seconds."""
    name = f"bench-raw-{uuid.uuid4().hex[:12]}"
    cmd = [
        "docker", "run", "--rm", "--init", "--name", name,
        "--user", RUNNER_USER, "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1024m,mode=1777",
        "--memory", f"{int(MEMORY_GB * 1024**3)}", "--memory-swap", f"{int(MEMORY_GB * 1024**3)}",
        "--cpus", str(CPUS), "--pids-limit", str(PIDS),
        image, "--stdout", "probe",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or '"non_root": true' not in done.stdout:
        raise SystemExit(f"raw docker run failed: {done.stderr or done.stdout}")
    check = subprocess.run(["docker", "container", "inspect", name], capture_output=True, text=True)
    if check.returncode == 0:
        raise SystemExit(f"raw docker run returned before its container {name} was removed")
    return elapsed


async def through_ktrdr(session: Session, watcher: RemovalWatcher) -> tuple[float, float]:
    """One probe op; returns (seconds to outcome known and container removed, seconds to
    terminal status)."""
    job = Job(
        job_id=f"bench-{uuid.uuid4().hex[:12]}",
        kind="probe",
        resources=Resources(cpus=CPUS, memory_gb=MEMORY_GB),
    )
    start = time.perf_counter()
    op_id = await session.submit(job)
    state = ""
    async for event in session.follow(op_id):
        if isinstance(event, StatusEvent):
            state = event.state
    terminal_at = time.perf_counter()
    if state != "completed":
        raise SystemExit(f"op {op_id} ended {state}")
    removed_at = await watcher.wait_gone(op_id, timeout_s=REMOVAL_TIMEOUT_S)
    return max(terminal_at, removed_at) - start, terminal_at - start


POOL = PoolConfig(shapes=[PoolShape(cpus=CPUS, memory_gb=MEMORY_GB, min=1, max=2)])


async def pool_quiet(stack: Stack) -> None:
    """Until the dispatcher's pool has a warm container and none warming (untimed)."""
    pool = stack.dispatcher.pool
    if pool is None:
        return
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        sizes = pool.sizes()
        warm = sum(n for (_shape, state), n in sizes.items() if state == "warm")
        warming = sum(n for (_shape, state), n in sizes.items() if state == "warming")
        if warm and not warming:
            return
        await asyncio.sleep(0.05)
    raise SystemExit("the warm pool did not fill within 60 s")


async def measure(runs: int, pool: PoolConfig | None) -> tuple[list[float], list[float], list[float], str]:
    """Alternating raw and ktrdr-run runs; (raw, ours, ours to terminal status, image)."""
    watcher = RemovalWatcher()
    try:
        async with bench_stack(DispatcherConfig(pids_limit=PIDS), pool=pool) as stack:
            # one warm-up of each, not counted
            await pool_quiet(stack)
            await asyncio.to_thread(raw_docker_run, stack.image)
            await pool_quiet(stack)
            await through_ktrdr(stack.session, watcher)
            raw, ours, ours_terminal = [], [], []
            for _ in range(runs):
                await pool_quiet(stack)
                raw.append(await asyncio.to_thread(raw_docker_run, stack.image))
                await pool_quiet(stack)
                removed, terminal = await through_ktrdr(stack.session, watcher)
                ours.append(removed)
                ours_terminal.append(terminal)
    finally:
        watcher.close()
    return raw, ours, ours_terminal, stack.image


async def main(runs: int, modes: list[str]) -> None:
    print(f"runs: {runs} each side, alternating, after one warm-up each")
    print("endpoint (both sides): outcome known to the client AND container removed")
    for mode in modes:
        raw, ours, ours_terminal, image = await measure(runs, POOL if mode == "on" else None)
        report(f"warm pool {mode}", raw, ours, ours_terminal, image)


def report(title: str, raw: list[float], ours: list[float], ours_terminal: list[float], image: str) -> None:
    """Both medians, the ratio, and ours to terminal status."""
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    print(f"\n== {title} ({image})")
    rows = (("raw docker run --rm", raw), ("ktrdr-run probe", ours))
    for label, values in rows:
        p90_ms = percentile(values, 90) * 1000
        print(f"{label + ' median':<27} {statistics.median(values) * 1000:8.1f} ms   (p90 {p90_ms:.1f} ms)")
    print(f"ratio ktrdr-run / raw       {ours_median / raw_median:8.2f}")
    p90_ms = percentile(ours_terminal, 90) * 1000
    print(
        f"(ktrdr-run to terminal status only, not compared: median "
        f"{statistics.median(ours_terminal) * 1000:.1f} ms, p90 {p90_ms:.1f} ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pool", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    run(main(args.runs, ["off", "on"] if args.pool == "both" else [args.pool]))
