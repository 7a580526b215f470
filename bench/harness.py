"""The stack every benchmark runs against: a nats-server with JetStream on a random
port and its own store, and an in-process dispatcher on the local Docker engine."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.docker_engines import engine_host
from dispatcher.config import Config, DispatcherConfig, NatsConfig
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.fleet import Fleet
from dispatcher.images import ensure_runner_image
from dispatcher.service import Dispatcher
from dispatcher.session import Session


class Stack:
    """What a benchmark gets: a session to submit and follow with, and the image."""

    def __init__(self, session: Session, image: str, dispatcher: Dispatcher) -> None:
        self.session = session
        self.image = image
        self.dispatcher = dispatcher


@contextlib.asynccontextmanager
async def bench_stack(dispatcher_config: DispatcherConfig | None = None) -> AsyncIterator[Stack]:
    """Start the stack; everything is stopped and removed afterwards."""
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
            dispatcher=dispatcher_config or DispatcherConfig(),
        )
        async with Session(config, need_dispatcher=False) as session:
            assert session.nc is not None and session.handles is not None
            fleet = Fleet.single(engine, engine_host(client))
            dispatcher = Dispatcher(config, session.nc, session.handles, fleet, lambda: image)
            task = asyncio.create_task(dispatcher.run(idle_s=0.5))
            try:
                yield Stack(session, image, dispatcher)
            finally:
                dispatcher.stop()
                await task
    finally:
        engine.close()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(state, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def describe(values: list[float]) -> str:
    """Median and p95 in milliseconds."""
    return f"median {statistics.median(values) * 1000:7.1f} ms   p95 {percentile(values, 95) * 1000:7.1f} ms"
