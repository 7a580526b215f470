"""Shared fixtures: a real nats-server with JetStream per test (random port, own store),
the real Docker engine, the runner image, and an in-process dispatcher.

Under CI=true a missing Docker engine or nats-server fails the test; elsewhere it skips.
Every test that touches Docker is checked afterwards for containers left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from discovery.docker_engines import engine_host
from dispatcher.config import Config, DispatcherConfig, NatsConfig, config_toml
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.errors import DockerUnavailable
from dispatcher.fleet import Fleet
from dispatcher.images import ensure_runner_image
from dispatcher.jetstream import JetStreamHandles, ensure_jetstream
from dispatcher.service import Dispatcher
from runner.protocol import LABEL_DISPATCHER, LABEL_OP_ID

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every dispatcher a test starts carries this prefix in its id (and so in the containers'
# ktrdr.dispatcher label): leftover checks look only at this test session's containers.
SESSION_TAG = f"test-{uuid.uuid4().hex[:8]}"


class Leftover:
    """A container found by :func:`our_containers` (from one listing call: containers of
    other test processes may come and go meanwhile)."""

    def __init__(self, client: docker.DockerClient, entry: dict[str, Any]) -> None:
        self._client = client
        self.id = str(entry["Id"])
        self.name = str((entry.get("Names") or ["?"])[0]).lstrip("/")

    def remove(self, force: bool = True) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._client.api.remove_container(self.id, force=force)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Leftover) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Leftover({self.name})"


def our_containers(client: docker.DockerClient) -> list[Leftover]:
    """Containers labelled ktrdr.op_id that this test session's dispatchers created."""
    return [
        Leftover(client, entry)
        for entry in client.api.containers(all=True, filters={"label": LABEL_OP_ID})
        if (entry.get("Labels") or {}).get(LABEL_DISPATCHER, "").startswith(SESSION_TAG)
    ]


class ContainerCreations:
    """Every container create of one engine (label ktrdr.op_id), recorded live from when
    it starts: an engine remembers only its last 256 events, too few to count from
    afterwards while tests and their containers run side by side."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._lock = threading.Lock()
        self._creates: list[tuple[float, str, str]] = []  # (time, op id, attempt label)
        self._stream = client.api.events(
            filters={"type": "container", "event": "create", "label": LABEL_OP_ID}, decode=True
        )
        threading.Thread(target=self._read, daemon=True, name="creations").start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                with self._lock:
                    self._creates.append(
                        (
                            float(event.get("time") or 0),
                            attrs.get(LABEL_OP_ID, ""),
                            attrs.get("ktrdr.attempt", "?"),
                        )
                    )

    def by_attempt(self, op_id: str, since: float) -> dict[str, int]:
        """Containers created for each attempt of ``op_id`` since ``since``."""
        time.sleep(0.2)  # an event is delivered within milliseconds of the create
        counts: dict[str, int] = {}
        with self._lock:
            for ts, op, attempt in self._creates:
                if op == op_id and ts >= int(since) - 1:
                    counts[attempt] = counts.get(attempt, 0) + 1
        return counts

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()


_CREATIONS: dict[str, ContainerCreations] = {}


def creations(client: docker.DockerClient) -> ContainerCreations:
    """The live create recorder of ``client``'s engine (started on first use)."""
    key = client.api.base_url
    if key not in _CREATIONS:
        _CREATIONS[key] = ContainerCreations(client)
    return _CREATIONS[key]


def unavailable(reason: str) -> None:
    """Fail under CI (the real thing must be there), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: tests that need it fail, never skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = connect_docker()
    except DockerUnavailable as exc:
        unavailable(str(exc))
    creations(client)  # from the start: every test's creates are counted
    yield client
    for recorder in _CREATIONS.values():
        recorder.close()
    leftover = our_containers(client)
    for container in leftover:
        container.remove(force=True)
    client.close()
    assert not leftover, f"containers left behind by the test suite: {[c.name for c in leftover]}"


@pytest.fixture(scope="session")
def runner_image(docker_client: docker.DockerClient) -> str:
    return ensure_runner_image(docker_client, progress=lambda line: None)


@pytest.fixture
def no_leftover_containers(docker_client: docker.DockerClient) -> Iterator[None]:
    """Fails the test if it leaves a container labelled ktrdr.op_id behind."""
    before = {c.id for c in our_containers(docker_client)}
    yield
    new = [c for c in our_containers(docker_client) if c.id not in before]
    for container in new:
        container.remove(force=True)
    assert not new, f"test left containers behind: {[c.name for c in new]}"


@pytest.fixture
def tmp_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ktrdr-test-"))
    yield path
    if not os.environ.get("KTRDR_KEEP_TEST_STATE"):  # set it to read a failed test's logs
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def nats_server(tmp_state: Path) -> AsyncIterator[EmbeddedNats]:
    """A real nats-server with JetStream on a random port: an operator's own server,
    without authentication (test_nats_auth covers the authenticated setup), listening
    where containers can reach it."""
    server = EmbeddedNats(tmp_state / "nats", free_port(), host="0.0.0.0")
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start means unavailable
        unavailable(f"nats-server could not start: {exc}")
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
def config(nats_server: EmbeddedNats, tmp_state: Path) -> Config:
    return Config(
        state_dir=str(tmp_state),
        nats=NatsConfig(url=nats_server.url, embedded=False),
        dispatcher=DispatcherConfig(
            dispatcher_id=f"{SESSION_TAG}-{uuid.uuid4().hex[:6]}",
            cancel_grace_s=3.0,
            heartbeat_s=1.0,
            progress_record_interval_s=0.2,
            ack_wait_s=10.0,
            # the tests' data directories are made under the test's state directory
            data_roots=[str(tmp_state)],
        ),
    )


# The installed console script, next to the interpreter running the tests (PATH may not
# include the virtualenv).
KTRDR_RUN = str(Path(sys.executable).parent / "ktrdr-run")


def run_cli(args: list[str], config_path: Path, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``ktrdr-run ARGS`` with ``config_path`` as its config, no stdin."""
    env = {**os.environ, "KTRDR_RUN_CONFIG": str(config_path)}
    return subprocess.run(
        [KTRDR_RUN, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def ktrdr_csv(frame: Any, path: Path) -> None:
    """Write OHLCV bars (a DatetimeIndex and capitalised columns, as backtesting.py's test
    data has them) in KTRDR's layout: UTC timestamp index, lower-case columns; readable by
    the runner's user."""
    import pandas as pd

    out = frame.rename(columns=str.lower)[["open", "high", "low", "close", "volume"]].copy()
    out.index = pd.DatetimeIndex(out.index).tz_localize("UTC")
    out.index.name = "timestamp"
    out.to_csv(path, date_format="%Y-%m-%dT%H:%M:%SZ")
    path.chmod(0o644)


def write_config(config: Config, path: Path) -> Path:
    """Write ``config`` as TOML for a CLI subprocess."""
    path.write_bytes(config_toml(config))
    return path


@pytest.fixture
async def js_handles(config: Config) -> AsyncIterator[JetStreamHandles]:
    nc = await connect(config.nats.url, name="test")
    handles = await ensure_jetstream(nc, config, mode="apply")
    yield handles
    await nc.drain()


class RunningDispatcher:
    """A Dispatcher running as a task in the test's event loop."""

    def __init__(self, dispatcher: Dispatcher, task: asyncio.Task[None]) -> None:
        self.dispatcher = dispatcher
        self.task = task


@pytest.fixture
async def dispatcher(
    config: Config,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
) -> AsyncIterator[RunningDispatcher]:
    nc = await connect(config.nats.url, name="test-dispatcher")
    handles = await ensure_jetstream(nc, config, mode="apply")
    client = connect_docker()
    host = engine_host(client)
    engine = DockerEngine(client, name=host.name)
    service = Dispatcher(config, nc, handles, Fleet.single(engine, host), lambda: runner_image)
    task = asyncio.create_task(service.run(idle_s=0.5))
    yield RunningDispatcher(service, task)
    service.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 60)
    await nc.drain()
    engine.close()
