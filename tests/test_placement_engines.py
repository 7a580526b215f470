"""Placement across real engines: the local dockerd and a second one reached over TCP
with TLS certificates the test generates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import pytest
from nats.aio.client import RawCredentials

from discovery.config import DiscoveryConfig, EngineConfig, GpuSpec, StaticGpuHost
from dispatcher.authority import Authority, write_secret
from dispatcher.config import Config, NatsConfig
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine
from dispatcher.fleet import Fleet, build_fleet
from dispatcher.jetstream import JetStreamHandles, ensure_jetstream
from dispatcher.runner_access import RunnerAccess
from dispatcher.service import Dispatcher
from runner.protocol import TERMINAL_STATES
from tests.conftest import SESSION_TAG
from tests.second_dockerd import (
    SecondDockerd,
    links_in,
    second_dockerd_fixture,  # noqa: F401 - the fixture, imported to be used here
    start_second_dockerd,
    stop_second_dockerd,
)
from tests.test_core_path import read_op_events
from tests.test_lifecycle import get_record, publish_job, wait_for_state

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def with_discovery(config: Config, discovery: DiscoveryConfig, suffix: str) -> Config:
    return msgspec.structs.replace(
        config,
        discovery=discovery,
        dispatcher=msgspec.structs.replace(config.dispatcher, dispatcher_id=f"{SESSION_TAG}-{suffix}"),
    )


async def wait_for_progress(url: str, op_id: str, creds: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = await get_record(url, op_id, creds=creds)
        if (record.get("progress") or {}).get("percent", 0) > 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"op {op_id} reported no progress within {timeout_s}s")


@contextlib.asynccontextmanager
async def start(
    config: Config, image: str, authority: Authority | None = None
) -> AsyncIterator[tuple[Dispatcher, Fleet]]:
    """A dispatcher on ``config``; with ``authority`` it connects with the deployment's
    credentials and gives every op its own (on the container's stdin)."""
    creds = RawCredentials(authority.mint("dispatcher", "test")) if authority else None
    nc = await connect(config.nats.url, name="test", credentials=creds)
    handles = await ensure_jetstream(nc, config, mode="apply")
    fleet, _client = await build_fleet(config)
    service = Dispatcher(
        config, nc, handles, fleet, lambda: image, runner_access=RunnerAccess(authority=authority)
    )
    task = asyncio.create_task(service.run(idle_s=0.3))
    try:
        yield service, fleet
    finally:
        service.stop()
        await asyncio.wait_for(task, 120)
        await nc.drain()
        fleet.close()


async def wait_hosts(fleet: Fleet, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(fleet.hosts()) < count:
        assert time.monotonic() < deadline, f"hosts: {[h.name for h in fleet.hosts()]}"
        await asyncio.sleep(0.2)


async def test_ops_spread_over_two_engines_and_move_when_one_stops(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    no_leftover_containers: None,
) -> None:
    """On an authenticated server: each op's credentials reach its container on either
    engine (the remote one over TLS) through its standard input."""
    authority = Authority.load_or_create(tmp_state)
    server = EmbeddedNats(tmp_state / "secured", free_port(), host="0.0.0.0", trust=authority.trust_block())
    await server.start()
    creds = str(write_secret(tmp_state / "tester.creds", authority.mint("submitter", "tester")))
    config = msgspec.structs.replace(config, nats=NatsConfig(url=server.url, embedded=False))
    second = await asyncio.to_thread(start_second_dockerd, docker_client, runner_image)
    try:
        engine2 = EngineConfig(
            name="engine2",
            url=second.tcp_url,
            tls_ca=str(second.ca),
            tls_cert=str(second.client_cert),
            tls_key=str(second.client_key),
        )
        cfg = with_discovery(config, DiscoveryConfig(engines=[engine2], health_interval_s=1.0), "two")
        async with start(cfg, runner_image, authority) as (service, fleet):
            await wait_hosts(fleet, 2)
            local = next(h.name for h in fleet.hosts() if h.name != "engine2")
            per_engine = min(h.cpus for h in fleet.hosts())
            ids = [new_id("spread") for _ in range(4)]
            for op_id in ids:  # two fit on each engine at once
                job = {
                    "job_id": op_id,
                    "kind": "probe",
                    "params": {"hold_s": 8},
                    "resources": {"cpus": per_engine / 2},
                }
                await publish_job(cfg.nats.url, job, creds=creds, submitter="tester")
            first = [await wait_for_state(cfg.nats.url, op_id, {"running"}, 60, creds=creds) for op_id in ids]
            placed = {r["op_id"]: r["host"] for r in first}
            assert sorted(placed.values()) == sorted([local, local, "engine2", "engine2"]), placed
            for op_id in ids:  # each runner got onto NATS with its own credentials: it reports
                await wait_for_progress(cfg.nats.url, op_id, creds)

            await asyncio.to_thread(second.process.terminate)  # engine2 goes away mid-run
            records = [
                await wait_for_state(cfg.nats.url, op_id, TERMINAL_STATES, timeout_s=120, creds=creds)
                for op_id in ids
            ]
            assert service.fleet.is_down("engine2")
            events = {op_id: await read_op_events(cfg.nats.url, op_id, 5, creds=creds) for op_id in ids}
    finally:
        await asyncio.to_thread(stop_second_dockerd, second)
        await asyncio.to_thread(server.stop)
    # a killed engine's networks outlive it as Linux bridges; left, they use up the pools
    assert links_in(second.pool) == [], "the stopped engine's bridges are still there"
    assert [r["state"] for r in records] == ["completed"] * 4, [r.get("error") for r in records]
    for record in records:
        if placed[record["op_id"]] == "engine2":
            # moved to the engine that stays; a dockerd shutting down still answers pings for
            # a while, so an attempt may go back to it and fail to start before it is gone
            assert record["host"] == local and record["attempts"] >= 2
            states = [e["state"] for e in events[record["op_id"]] if e["event"] == "status"]
            assert "lost" in states, states
        else:
            assert record["attempts"] == 1


async def test_gpu_routing_device_request_and_replacement(
    config: Config,
    runner_image: str,
    second_dockerd: SecondDockerd,
    monkeypatch: pytest.MonkeyPatch,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    """A GPU-preferring op lands on the GPU host with a device request for the reserved
    GPU; that engine has no NVIDIA runtime, so the start fails with `could not select
    device driver`: the host is marked GPU-less, the container removed, the op placed
    again (on CPU) and it completes — not failed. `gpu: required` then fails fast."""
    creates: list[tuple[str, Any]] = []
    real_create = DockerEngine.create

    async def spy(self: DockerEngine, **kwargs: Any) -> str:  # records, then really creates
        creates.append((self.name, kwargs["host_config"].get("DeviceRequests")))
        return await real_create(self, **kwargs)

    monkeypatch.setattr(DockerEngine, "create", spy)
    gpu_box = StaticGpuHost(
        name="gpu-box",
        url=second_dockerd.tcp_url,
        tls_ca=str(second_dockerd.ca),
        tls_cert=str(second_dockerd.client_cert),
        tls_key=str(second_dockerd.client_key),
        gpus=[GpuSpec(index=0, model="H100", memory_gb=80)],
    )
    cfg = with_discovery(config, DiscoveryConfig(gpu_hosts=[gpu_box], health_interval_s=1.0), "gpu")
    async with start(cfg, runner_image) as (service, fleet):
        await wait_hosts(fleet, 2)
        op_id = await publish_job(
            cfg.nats.url, {"job_id": new_id("gpu"), "kind": "probe", "resources": {"gpu": "preferred"}}
        )
        record = await wait_for_state(cfg.nats.url, op_id, TERMINAL_STATES, timeout_s=60)
        assert record["state"] == "completed", record.get("error")
        assert record["attempts"] == 1  # re-placing is not a failed attempt
        assert record["host"] != "gpu-box"
        assert creates[0] == (
            "gpu-box",
            [{"Driver": "", "Count": 0, "DeviceIDs": ["0"], "Capabilities": [["gpu"]], "Options": {}}],
        )
        assert creates[1][0] == record["host"] and not creates[1][1]
        assert not service.fleet.gpu_usable(next(h for h in fleet.all_hosts() if h.name == "gpu-box"))
        statuses = [e for e in await read_op_events(cfg.nats.url, op_id, 5) if e["event"] == "status"]
        assert any("no usable GPU runtime" in e["message"] for e in statuses)

        required = await publish_job(
            cfg.nats.url, {"job_id": new_id("req"), "kind": "probe", "resources": {"gpu": "required"}}
        )
        failed = await wait_for_state(cfg.nats.url, required, TERMINAL_STATES, timeout_s=30)
        assert failed["state"] == "failed"
        assert failed["error"]["field"] == "resources.gpu"
        assert "no GPU capacity exists" in failed["error"]["message"]


async def test_gpu_required_without_gpu_hosts_fails_fast(config: Config, dispatcher: Any) -> None:
    started = time.monotonic()
    op_id = await publish_job(
        config.nats.url, {"job_id": new_id("nogpu"), "kind": "probe", "resources": {"gpu": "required"}}
    )
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=30)
    assert time.monotonic() - started < 5
    assert record["state"] == "failed" and record["error"]["reason"] == "invalid_job"
    assert record["error"]["message"].startswith("gpu: required, but no GPU capacity exists")
    assert "container_id" not in record or not record["container_id"]


async def test_hosts_snapshot_is_published(config: Config, dispatcher: Any) -> None:
    nc = await nats.connect(config.nats.url)
    kv = await nc.jetstream().key_value("ktrdr_hosts")
    deadline = time.monotonic() + 10
    keys: list[str] = []
    while not keys and time.monotonic() < deadline:
        try:
            keys = await kv.keys()
        except Exception:  # noqa: BLE001 - not published yet
            await asyncio.sleep(0.2)
    snap = json.loads((await kv.get(keys[0])).value)
    await nc.close()
    assert snap["state"] == "available" and snap["cpus"] > 0 and snap["free_cpus"] <= snap["cpus"]
