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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.docker_engines import engine_host
from dispatcher.config import Config, DispatcherConfig, NatsConfig
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import RUNNER_USER, DockerEngine, connect_docker
from dispatcher.images import ensure_runner_image
from dispatcher.service import Dispatcher
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
    state = Path(tempfile.mkdtemp(prefix="ktrdr-bench-"))
    server = EmbeddedNats(state / "nats", free_port())
    await server.start()
    client = connect_docker()
    engine = DockerEngine(client, name="local")
    try:
        image = ensure_runner_image(client, progress=lambda line: print(line, file=sys.stderr))
        config = Config(
            state_dir=str(state),
            nats=NatsConfig(url=server.url, embedded=False),
            dispatcher=DispatcherConfig(pids_limit=PIDS),
        )
        async with Session(config, need_dispatcher=False) as session:
            assert session.nc is not None and session.handles is not None
            host = engine_host(client)
            dispatcher = Dispatcher(config, session.nc, session.handles, engine, host, lambda: image)
            task = asyncio.create_task(dispatcher.run(idle_s=0.5))
            # one warm-up of each, not counted
            await asyncio.to_thread(raw_docker_run, image)
            await through_ktrdr(session)
            raw, ours = [], []
            for _ in range(runs):
                raw.append(await asyncio.to_thread(raw_docker_run, image))
                ours.append(await through_ktrdr(session))
            dispatcher.stop()
            await task
        raw_median, ours_median = statistics.median(raw), statistics.median(ours)
        print(f"image                       {image}")
        print(f"runs                        {runs} each, alternating, after one warm-up each")
        print(f"raw docker run --rm median  {raw_median * 1000:8.1f} ms   (p90 {_p90(raw) * 1000:.1f} ms)")
        print(f"ktrdr-run probe median      {ours_median * 1000:8.1f} ms   (p90 {_p90(ours) * 1000:.1f} ms)")
        print(f"ratio ktrdr-run / raw       {ours_median / raw_median:8.2f}")
    finally:
        engine.close()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(state, ignore_errors=True)


def _p90(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.9 * len(values)) - 1)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
