"""Dispatch overhead: submit-to-terminal of `probe` ops vs a raw `docker run --rm`.

Both sides run the same image and the same probe code, with the same hardening flags:
ours through the whole path (publish the job → dispatcher → hardened container →
runner over JetStream → terminal status seen by the client), the reference as
`docker run --rm IMAGE --stdout probe`, which prints the result instead of publishing
it. Runs alternate, so both see the same machine state. Prints both medians and the
ratio.

    python bench/overhead.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid

from harness import bench_stack, percentile

from dispatcher.config import DispatcherConfig
from dispatcher.engine import RUNNER_USER
from dispatcher.session import Session
from runner.protocol import Job, Resources, StatusEvent

CPUS, MEMORY_GB, PIDS = 0.5, 0.5, 512


def raw_docker_run(image: str) -> float:
    """One `docker run --rm` of the probe, hardened the same way; returns seconds."""
    cmd = [
        "docker", "run", "--rm", "--init",
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
    return elapsed


async def through_ktrdr(session: Session) -> float:
    """One probe op, publish to terminal status; returns seconds."""
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
    elapsed = time.perf_counter() - start
    if state != "completed":
        raise SystemExit(f"op {op_id} ended {state}")
    return elapsed


async def main(runs: int) -> None:
    async with bench_stack(DispatcherConfig(pids_limit=PIDS)) as stack:
        # one warm-up of each, not counted
        await asyncio.to_thread(raw_docker_run, stack.image)
        await through_ktrdr(stack.session)
        raw, ours = [], []
        for _ in range(runs):
            raw.append(await asyncio.to_thread(raw_docker_run, stack.image))
            ours.append(await through_ktrdr(stack.session))
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    print(f"image                       {stack.image}")
    print(f"runs                        {runs} each, alternating, after one warm-up each")
    rows = (("raw docker run --rm", raw, raw_median), ("ktrdr-run probe", ours, ours_median))
    for label, values, median in rows:
        p90_ms = percentile(values, 90) * 1000
        print(f"{label + ' median':<27} {median * 1000:8.1f} ms   (p90 {p90_ms:.1f} ms)")
    print(f"ratio ktrdr-run / raw       {ours_median / raw_median:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
