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

    python bench/overhead.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid

from harness import RemovalWatcher, bench_stack, percentile, run

from dispatcher.config import DispatcherConfig
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


async def main(runs: int) -> None:
    watcher = RemovalWatcher()
    try:
        async with bench_stack(DispatcherConfig(pids_limit=PIDS)) as stack:
            # one warm-up of each, not counted
            await asyncio.to_thread(raw_docker_run, stack.image)
            await through_ktrdr(stack.session, watcher)
            raw, ours, ours_terminal = [], [], []
            for _ in range(runs):
                raw.append(await asyncio.to_thread(raw_docker_run, stack.image))
                removed, terminal = await through_ktrdr(stack.session, watcher)
                ours.append(removed)
                ours_terminal.append(terminal)
    finally:
        watcher.close()
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    print(f"image                       {stack.image}")
    print(f"runs                        {runs} each, alternating, after one warm-up each")
    print("endpoint (both sides)       outcome known to the client AND container removed")
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
    run(main(parser.parse_args().runs))
