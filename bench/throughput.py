"""Short-op throughput on one engine, warm pool off and on, and the dispatcher's CPU per op.

A nats-server of the bench's own (random port, own store) and ``ktrdr-run dispatcher`` as
a process of its own on the local engine, started once with the pool off and once with
``[[pool.shapes]]`` of the ops' shape (warmed for ``probe``). The ops are ``probe`` ops
(the shortest op: it inspects its container and reports), each in a fresh container.

Two loads, each timed from the first job published to the last op's terminal status seen
by the client:

- **burst**: N jobs published at once (the queue is deep: every op waits for room);
- **stream**: a client keeping K ops in flight, publishing the next when one ends (a
  steady flow below the engine's capacity, as a user or a small sweep makes).

The dispatcher's CPU per op is its process's user+system time (``/proc/<pid>/stat``)
over the load, divided by the ops: the service's own work (intake, records, placement,
supervision, Docker API calls), not the containers'. With the pool on, the load starts
once the pool is full (read from the dispatcher's own ``/metrics``).

    python bench/throughput.py [--ops 60] [--in-flight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats
from harness import run
from service_process import DispatcherProcess, cpu_seconds, wait_ready

from dispatcher.config import Config, DispatcherConfig, MetricsConfig, NatsConfig, PoolConfig, PoolShape
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import connect_docker
from dispatcher.images import ensure_runner_image
from runner.protocol import TERMINAL_STATES, Job, Resources, encode, job_subject

CPUS, MEMORY_GB = 0.25, 0.25
SHAPE = PoolShape(cpus=CPUS, memory_gb=MEMORY_GB, min=2, max=4, kinds=["probe"])


class Terminals:
    """Terminal status events of every op, as they arrive (one subscription)."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def on_status(self, msg: Any) -> None:
        event = json.loads(msg.data)
        if event.get("state") in TERMINAL_STATES:
            self.ended.setdefault(event["op_id"], event["state"])
            self.changed.set()

    async def wait(self, op_ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not op_ids <= self.ended.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(op_ids - self.ended.keys())
                raise SystemExit(f"{len(missing)} op(s) not finished in {timeout_s:g}s, e.g. {missing[:3]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                pass


async def publish(js: Any, tag: str) -> str:
    job = Job(
        job_id=f"tp-{tag}-{uuid.uuid4().hex[:10]}",
        kind="probe",
        resources=Resources(cpus=CPUS, memory_gb=MEMORY_GB),
    )
    await js.publish(job_subject("probe"), encode(job), headers={"Nats-Msg-Id": job.job_id})
    return job.job_id


async def burst(js: Any, terminals: Terminals, n: int) -> set[str]:
    ids = {await publish(js, "burst") for _ in range(n)}
    await terminals.wait(ids, 60 + n * 5)
    return ids


async def stream(js: Any, terminals: Terminals, n: int, in_flight: int) -> set[str]:
    ids: set[str] = set()
    open_ids: set[str] = set()
    while len(ids) < n or open_ids:
        while len(ids) < n and len(open_ids) < in_flight:
            op_id = await publish(js, "stream")
            ids.add(op_id)
            open_ids.add(op_id)
        terminals.changed.clear()
        open_ids -= terminals.ended.keys()
        if open_ids and (len(ids) == n or len(open_ids) >= in_flight):
            try:
                await asyncio.wait_for(terminals.changed.wait(), 120)
            except TimeoutError:
                raise SystemExit(f"no op ended within 120 s ({len(open_ids)} in flight)") from None
    return ids


def pool_warm(port: int) -> int:
    """Warm pool containers, from the dispatcher's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("ktrdr_pool_containers{") and 'state="warm"' in line
    )


async def wait_pool_full(port: int, want: int, process: DispatcherProcess) -> None:
    deadline = time.monotonic() + 120
    while await asyncio.to_thread(pool_warm, port) < want:
        if time.monotonic() > deadline or not process.alive():
            raise SystemExit(f"the pool did not fill to {want}:\n{process.log_tail()}")
        await asyncio.sleep(0.2)


async def one_mode(
    state: Path, url: str, pool: bool, n: int, in_flight: int
) -> dict[str, tuple[float, float, int]]:
    """{load: (ops/s, dispatcher CPU ms per op, ops not completed)} for one pool setting."""
    metrics_port = free_port()
    config = Config(
        state_dir=str(state),
        nats=NatsConfig(url=url, embedded=False),
        dispatcher=DispatcherConfig(dispatcher_id=f"bench-tp-{uuid.uuid4().hex[:6]}"),
        metrics=MetricsConfig(listen=f"127.0.0.1:{metrics_port}"),
        pool=PoolConfig(shapes=[SHAPE] if pool else []),
    )
    process = DispatcherProcess(config, state, f"dispatcher-pool-{'on' if pool else 'off'}")
    nc = await nats.connect(url)
    js = nc.jetstream()
    terminals = Terminals()
    await nc.subscribe("ktrdr.ops.*.status", cb=terminals.on_status)
    results: dict[str, tuple[float, float, int]] = {}
    try:
        process.start()
        await wait_ready(nc, process)
        for load in ("burst", "stream"):
            if pool:
                await wait_pool_full(metrics_port, SHAPE.min, process)
            cpu_before = cpu_seconds(process.pid)
            started = time.perf_counter()
            ids = await (burst(js, terminals, n) if load == "burst" else stream(js, terminals, n, in_flight))
            elapsed = time.perf_counter() - started
            cpu_ms = (cpu_seconds(process.pid) - cpu_before) * 1000 / n
            failed = sum(1 for op_id in ids if terminals.ended[op_id] != "completed")
            results[load] = (n / elapsed, cpu_ms, failed)
    finally:
        process.stop()
        await nc.close()
    return results


async def main(n: int, in_flight: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="ktrdr-bench-tp-"))
    server = EmbeddedNats(state / "nats", free_port(), host="0.0.0.0")
    try:
        await asyncio.to_thread(ensure_runner_image, connect_docker(), progress=lambda line: None)
        await server.start()
        modes = {"off": await one_mode(state, server.url, False, n, in_flight)}
        modes["on"] = await one_mode(state, server.url, True, n, in_flight)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(state, ignore_errors=True)
    print(
        f"{n} probe ops per load, one engine, {os.cpu_count()} CPUs; "
        f"pool shape {CPUS:g} CPU / {MEMORY_GB:g} GB"
    )
    print(f"{'load':<30}{'pool off':>12}{'pool on':>12}{'on / off':>10}")
    for load, title in (("burst", f"burst of {n}: ops/s"), ("stream", f"{in_flight} in flight: ops/s")):
        off, on = modes["off"][load], modes["on"][load]
        print(f"{title:<30}{off[0]:>12.2f}{on[0]:>12.2f}{on[0] / off[0]:>10.2f}")
        print(f"{'  dispatcher CPU ms/op':<30}{off[1]:>12.1f}{on[1]:>12.1f}{on[1] / off[1]:>10.2f}")
        if off[2] or on[2]:
            print(f"  NOT COMPLETED: pool off {off[2]}, pool on {on[2]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=60)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    run(main(args.ops, args.in_flight))
