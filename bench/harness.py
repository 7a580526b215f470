"""The stack every benchmark runs against: a nats-server with JetStream on a random
port and its own store, and an in-process dispatcher on the local Docker engine; and a
watcher that tells when an op's containers are gone."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import docker
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.docker_engines import engine_host
from dispatcher.config import Config, DispatcherConfig, NatsConfig, PoolConfig
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.fleet import Fleet
from dispatcher.images import ensure_runner_image
from dispatcher.service import Dispatcher
from ktrdr_run.session import Session
from runner.protocol import LABEL_DISPATCHER, LABEL_OP_ID, LABEL_POOL, op_of_container


class Stack:
    """What a benchmark gets: a session to submit and follow with, and the image."""

    def __init__(self, session: Session, image: str, dispatcher: Dispatcher, server: EmbeddedNats) -> None:
        self.session = session
        self.image = image
        self.dispatcher = dispatcher
        self._server = server

    def nats_alive(self) -> bool:
        """Whether the stack's nats-server still runs (a signal sent to the whole process
        group, as Ctrl-C and ``timeout`` send, stops it together with the benchmark)."""
        process = self._server.process
        return process is not None and process.poll() is None


async def wait_while_nats_alive(task: asyncio.Future[Any], stack: Stack, timeout_s: float) -> bool:
    """Wait for ``task`` up to ``timeout_s``, giving up early once NATS is gone (what
    needs it cannot finish then); True when it finished."""
    deadline = time.monotonic() + timeout_s
    while not task.done():
        left = deadline - time.monotonic()
        if left <= 0 or not stack.nats_alive():
            return False
        await asyncio.wait({task}, timeout=min(left, 0.25))
    return True


async def cancel_hard(task: asyncio.Future[Any], tries: int = 20) -> bool:
    """Cancel ``task`` until it ends (cleanup code may absorb one cancel and start waiting
    for NATS again), up to ``tries`` times a second apart; True when it ended."""
    for _ in range(tries):
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        if task.done():
            return True
    return False


STOP_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def bench_stack(
    dispatcher_config: DispatcherConfig | None = None, pool: PoolConfig | None = None
) -> AsyncIterator[Stack]:
    """Start the stack (with a warm pool when ``pool`` has shapes); everything is stopped
    and removed afterwards, also after an interruption (containers of its dispatcher that
    are still there are force-removed)."""
    state = Path(tempfile.mkdtemp(prefix="ktrdr-bench-"))
    server = EmbeddedNats(state / "nats", free_port(), host="0.0.0.0")
    engine: DockerEngine | None = None
    try:
        await server.start()
        client = connect_docker()
        engine = DockerEngine(client, name="local")
        image = ensure_runner_image(client, progress=lambda line: print(line, file=sys.stderr))
        config = Config(
            state_dir=str(state),
            nats=NatsConfig(url=server.url, embedded=False),
            # the benchmarks' data directories are temporary directories
            dispatcher=msgspec.structs.replace(
                dispatcher_config or DispatcherConfig(), data_roots=[tempfile.gettempdir()]
            ),
            pool=pool or PoolConfig(),
        )
        # the bench runs the dispatcher itself: it sets JetStream up like the service does
        async with Session(config, need_dispatcher=False, setup="apply") as session:
            assert session.nc is not None and session.handles is not None
            fleet = Fleet.single(engine, engine_host(client))
            dispatcher = Dispatcher(config, session.nc, session.handles, fleet, lambda: image)
            stack = Stack(session, image, dispatcher, server)
            task = asyncio.create_task(dispatcher.run(idle_s=0.5))
            try:
                yield stack
            finally:
                dispatcher.stop()
                await _finish(task, stack, client)
    finally:
        if engine is not None:
            engine.close()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(state, ignore_errors=True)


async def _finish(task: asyncio.Task[None], stack: Stack, client: docker.DockerClient) -> None:
    """Let the stopped dispatcher finish its ops (for at most STOP_TIMEOUT_S, and only
    while NATS runs), else cancel it; then remove whatever container of this dispatcher
    is left, and say so. A dispatcher that crashed re-raises its error."""
    try:
        if not await wait_while_nats_alive(task, stack, STOP_TIMEOUT_S):
            why = "NATS is gone" if not stack.nats_alive() else f"still busy {STOP_TIMEOUT_S:g}s after stop"
            print(f"dispatcher: {why}; cancelling it", file=sys.stderr)
            if not await cancel_hard(task):
                print("dispatcher: did not end when cancelled; left running", file=sys.stderr)
    finally:
        mine = {"label": f"{LABEL_DISPATCHER}={stack.dispatcher.dispatcher_id}"}
        found = await asyncio.to_thread(client.api.containers, all=True, quiet=True, filters=mine)
        for container in found:
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(client.api.remove_container, container["Id"], force=True)
        if found:
            print(f"removed {len(found)} container(s) the dispatcher left behind", file=sys.stderr)
    if task.done() and not task.cancelled():
        task.result()


def run(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)``, with SIGTERM (as from ``timeout``) cancelling it as Ctrl-C
    does, so the ops a benchmark started, the stack and its state directory are cleaned
    up either way."""

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await main
        except asyncio.CancelledError:
            raise SystemExit("interrupted: cleaned up") from None

    asyncio.run(guarded())


class RemovalWatcher:
    """Tells when no container of an op (labelled ``ktrdr.op_id=<op>``, or a warm pool
    container named after it) exists any more.

    The engine's ``destroy`` events for op containers are read on a thread of their own;
    for each op it keeps the ``time.perf_counter()`` at which this process received the
    last one. :meth:`wait_gone` returns that moment once docker, asked afterwards, lists no
    container of the op (so it is the moment the client learned of the removal, as a
    ``docker run --rm`` learns it when its container is removed). Start it before the ops.
    """

    def __init__(self) -> None:
        self.client = docker.from_env()
        self.removed_at: dict[str, float] = {}
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._events = self.client.events(
            decode=True, filters={"type": "container", "event": "destroy", "label": LABEL_OP_ID}
        )
        self._thread = threading.Thread(target=self._run, name="destroy-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._events:
                received = time.perf_counter()
                attributes = event.get("Actor", {}).get("Attributes", {})
                op_id, _attempt = op_of_container(attributes.get("name", ""), attributes)
                self.removed_at[op_id] = received
                self._loop.call_soon_threadsafe(self._changed.set)
        except Exception:  # noqa: BLE001 - the stream is closed at the end (or the loop is)
            return

    def containers_of(self, op_id: str) -> list[str]:
        """Ids of every container (any state) labelled with the op (blocking)."""
        found = self.client.api.containers(all=True, quiet=True, filters={"label": f"{LABEL_OP_ID}={op_id}"})
        # a warm pool container that ran the op: named after it (its labels predate it)
        named = self.client.api.containers(
            all=True, filters={"label": LABEL_POOL, "name": f"ktrdr-{op_id}-a"}
        )
        pooled = [c for c in named if op_of_container(c["Names"][0], c.get("Labels") or {})[0] == op_id]
        return [str(c["Id"]) for c in [*found, *pooled]]

    async def wait_gone(self, op_id: str, timeout_s: float = 30.0, fallback_s: float = 0.5) -> float:
        """Wait until no container of the op exists; returns when that became known
        (``perf_counter``). Woken by ``destroy`` events; without one, docker is asked
        every ``fallback_s`` (an op that never had a container), not at once, so as not
        to load the engine while it removes. SystemExit after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        next_check = time.monotonic() + fallback_s
        confirmed_stale: float | None = None  # a destroy seen while the op still had a container
        while True:
            self._changed.clear()
            seen = self.removed_at.get(op_id)
            if seen is not None and seen != confirmed_stale:
                if not await asyncio.to_thread(self.containers_of, op_id):
                    return seen
                confirmed_stale = seen  # another container of the op is still there
            elif time.monotonic() >= next_check:
                if not await asyncio.to_thread(self.containers_of, op_id):
                    return time.perf_counter()
                next_check = time.monotonic() + fallback_s
            left = deadline - time.monotonic()
            if left <= 0:
                remaining = await asyncio.to_thread(self.containers_of, op_id)
                if not remaining:
                    return time.perf_counter()
                ids = ", ".join(c[:12] for c in remaining)
                raise SystemExit(f"op {op_id}: container(s) {ids} still exist after {timeout_s:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, fallback_s))

    def close(self) -> None:
        self._events.close()
        self.client.close()
        self._thread.join(timeout=5)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def describe(values: list[float]) -> str:
    """Median and p95 in milliseconds."""
    return f"median {statistics.median(values) * 1000:7.1f} ms   p95 {percentile(values, 95) * 1000:7.1f} ms"
