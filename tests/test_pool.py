"""The warm pool (issue 14): started runner containers waiting for one op each.

Real Docker, real nats-server. What is shown: an op of a pool shape runs in a container
that existed (created, started, imports done) before the op was submitted, and that
container held nothing of the op until then (no spec in its environment, input open);
each warm container runs exactly one op and is removed; other shapes take the normal
path; the pool gives back room as soon as reservations need it; and when its dispatcher
is killed (SIGKILL, its own process), the waiting containers end by themselves and the
ops already running in pool containers are adopted and complete exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import msgspec
import pytest

from dispatcher.config import Config, MetricsConfig, PoolConfig, PoolShape, load_config
from dispatcher.errors import ConfigError
from dispatcher.jetstream import JetStreamHandles
from runner.protocol import EXIT_NOT_ASSIGNED, LABEL_DISPATCHER, LABEL_POOL, POOL_READY_LINE, TERMINAL_STATES
from tests.conftest import RunningDispatcher, our_containers
from tests.test_core_path import read_op_events
from tests.test_lifecycle import (
    new_id,
    process_config,
    publish_job,
    start_dispatcher_process,
    statuses,
    wait_for_state,
)
from tests.test_metrics import scrape

pytestmark = [pytest.mark.docker, pytest.mark.nats]

SHAPE = PoolShape(cpus=0.25, memory_gb=0.25, min=1, max=2)
POOLED = {"cpus": SHAPE.cpus, "memory_gb": SHAPE.memory_gb}


@pytest.fixture
def config(config: Config) -> Config:
    return msgspec.structs.replace(
        config, pool=PoolConfig(shapes=[SHAPE], idle_ttl_s=60.0), metrics=MetricsConfig(listen="127.0.0.1:0")
    )


def warm_containers(
    client: docker.DockerClient, dispatcher_id: str, *, running_only: bool = True, ready: bool = True
) -> list[dict[str, Any]]:
    """The engine's pool containers of one dispatcher not yet given an op (named
    ktrdr-pool-*); with ``ready``, only those whose runner said its imports are done."""
    listed = client.api.containers(
        all=not running_only, filters={"label": [LABEL_POOL, f"{LABEL_DISPATCHER}={dispatcher_id}"]}
    )
    found = [c for c in listed if c["Names"][0].startswith("/ktrdr-pool-")]
    if ready:
        found = [c for c in found if POOL_READY_LINE.encode() in client.api.logs(c["Id"], stderr=True)]
    return found


async def until(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Wait for ``check()`` to be truthy (polled), failing with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(check)
        if found:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s:g}s")


def created_at(client: docker.DockerClient, container_id: str) -> float:
    """When the engine created a container (seconds since the epoch), from its events."""
    for event in client.api.events(
        since=0,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": "create", "container": container_id},
    ):
        return float(event["timeNano"]) / 1e9
    raise AssertionError(f"no create event for {container_id[:12]}")


async def test_pool_shapes_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    cases = {
        "[[pool.shapes]]\ncpus = 1\nmemory_gb = 1\ngpus = 1\n": "gpus: warm pools are off for GPU shapes",
        "[[pool.shapes]]\ncpus = 1\nmemory_gb = 1\nmin = 3\nmax = 2\n": "min (3) is more than max (2)",
        "[[pool.shapes]]\ncpus = 1\n": "memory_gb",
        "[pool]\nidle_ttl_s = 0\n": "idle_ttl_s",
    }
    for text, said in cases.items():
        path = tmp_path / "ktrdr-run.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="pool") as caught:
            load_config(path, env={"HOME": str(tmp_path)})
        assert said in str(caught.value), (text, str(caught.value))


async def test_warm_containers_each_run_one_op_handed_over_at_assignment(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    me = dispatcher.dispatcher.dispatcher_id
    url = config.nats.url
    warm = await until("no warm container", lambda: [c for c in warm_containers(docker_client, me)])
    samples = await asyncio.to_thread(scrape, dispatcher.dispatcher.metrics.port)
    gauge = (("shape", "0.25cpu-0.25gb"), ("state", "warm"))
    assert samples[("ktrdr_pool_containers", gauge)] == len(warm) == SHAPE.min
    attrs = docker_client.api.inspect_container(warm[0]["Id"])
    env = attrs["Config"]["Env"] or []
    assert not any(e.startswith("KTRDR_SPEC=") for e in env), env  # nothing of an op yet
    assert attrs["Config"]["Cmd"][:1] == ["--pool"] and attrs["Config"]["OpenStdin"], attrs["Config"]
    assert attrs["HostConfig"]["NanoCpus"] == int(SHAPE.cpus * 1e9)

    used: list[str] = []
    for _ in range(4):
        await until("the pool was not refilled", lambda: warm_containers(docker_client, me))
        op_id = await publish_job(url, {"job_id": new_id("pool"), "kind": "probe", "resources": POOLED})
        record = await wait_for_state(url, op_id, TERMINAL_STATES, 60)
        assert record["state"] == "completed", record.get("error")
        cid = record["container_id"]
        # created before the op was even submitted: it was waiting, warm
        assert created_at(docker_client, cid) < record["timestamps"]["queued"], record["timestamps"]
        assert record["result"]["non_root"] is True
        assert abs(record["result"]["cpu_quota"] - SHAPE.cpus) < 1e-6  # the shape's limits hold
        used.append(cid)
        await until(
            "the op's container was not removed",
            lambda cid=cid: not docker_client.api.containers(all=True, filters={"id": cid}),
        )
        events = await read_op_events(url, op_id, 5)
        assert sum(1 for s in statuses(events) if s in TERMINAL_STATES) == 1
        assert not any(e.get("message") == "ktrdr-runner: warm, waiting for an op" for e in events)
    assert len(set(used)) == 4, "a warm container ran a second op"

    # another shape is not the pool's: a fresh container, created after the op was queued
    other = await publish_job(
        url, {"job_id": new_id("fresh"), "kind": "probe", "resources": {"cpus": 0.5, "memory_gb": 0.5}}
    )
    record = await wait_for_state(url, other, TERMINAL_STATES, 60)
    assert record["state"] == "completed", record.get("error")
    assert created_at(docker_client, record["container_id"]) >= record["timestamps"]["queued"] - 0.01


async def test_the_pool_gives_room_back_to_ops(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    """A host with room for two of the shape; the pool keeps two warm. An op that needs the
    whole host is placed at once (the pool never makes it wait) and the pool gives both
    back while it runs, then fills again."""
    from discovery.docker_engines import engine_host
    from dispatcher.connection import connect
    from dispatcher.engine import DockerEngine, connect_docker
    from dispatcher.fleet import Fleet
    from dispatcher.jetstream import ensure_jetstream
    from dispatcher.service import Dispatcher

    two = PoolShape(cpus=0.5, memory_gb=0.25, min=2, max=2)
    config = msgspec.structs.replace(config, pool=PoolConfig(shapes=[two], idle_ttl_s=60.0))
    client = connect_docker()
    host = dataclasses.replace(engine_host(client), cpus=1.0)
    engine = DockerEngine(client, name=host.name)
    nc = await connect(config.nats.url, name="test-pool-room")
    handles = await ensure_jetstream(nc, config, mode="apply")
    service = Dispatcher(config, nc, handles, Fleet.single(engine, host), lambda: runner_image)
    task = asyncio.create_task(service.run(idle_s=0.5))
    me = service.dispatcher_id
    try:
        await until("the pool did not fill to 2", lambda: len(warm_containers(docker_client, me)) == 2)
        op_id = await publish_job(
            config.nats.url,
            {
                "job_id": new_id("room"),
                "kind": "probe",
                "params": {"hold_s": 3},
                "resources": {"cpus": 1.0, "memory_gb": 0.25},
            },
        )
        await wait_for_state(config.nats.url, op_id, {"running"}, 30)
        await until(
            "the pool kept room the op needed",
            lambda: not warm_containers(docker_client, me, running_only=False, ready=False),
            10,
        )
        record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, 30)
        assert record["state"] == "completed", record.get("error")
        await until("the pool did not fill again", lambda: len(warm_containers(docker_client, me)) == 2)
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
        await nc.drain()
        engine.close()
    # stopping removed what it held
    assert warm_containers(docker_client, me, running_only=False, ready=False) == []


async def test_a_killed_dispatchers_warm_containers_end_and_its_pooled_ops_complete(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    """SIGKILL the dispatcher (its own process) with ops running in pool containers and
    warm ones waiting: the waiting ones exit by themselves (EXIT_NOT_ASSIGNED), a second
    dispatcher adopts the running ops (found by name), and each completes exactly once."""
    three = PoolShape(cpus=SHAPE.cpus, memory_gb=SHAPE.memory_gb, min=3, max=3)
    config = msgspec.structs.replace(config, pool=PoolConfig(shapes=[three], idle_ttl_s=60.0))
    config_path = process_config(config, tmp_state, "poolkill")
    me = load_config(config_path, env={}).dispatcher.dispatcher_id
    first = start_dispatcher_process(config_path, tmp_state / "dispatcher-1.log")
    try:
        await until("the pool did not fill", lambda: len(warm_containers(docker_client, me)) == 3, 90)
        ids = [new_id("pk") for _ in range(3)]
        for op_id in ids:
            job = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 6}, "resources": POOLED}
            await publish_job(config.nats.url, job)
        running = [await wait_for_state(config.nats.url, op_id, {"running"}, 60) for op_id in ids]
        pooled = [r["container_id"] for r in running]
        await until("the pool did not refill", lambda: len(warm_containers(docker_client, me)) >= 1, 60)
        waiting = [c["Id"] for c in warm_containers(docker_client, me)]
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        def ended_unassigned() -> bool:
            states = [docker_client.api.inspect_container(cid)["State"] for cid in waiting]
            return all(s["Status"] == "exited" and s["ExitCode"] == EXIT_NOT_ASSIGNED for s in states)

        await until("warm containers kept waiting for a dead dispatcher", ended_unassigned, 20)
        second = start_dispatcher_process(config_path, tmp_state / "dispatcher-2.log")
        try:
            records = [await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, 90) for op_id in ids]
            await until(
                "the dead pool's containers were not reaped",
                lambda: (
                    not any(docker_client.api.containers(all=True, filters={"id": cid}) for cid in waiting)
                ),
                30,
            )
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["state"] for r in records] == ["completed"] * 3, [
        (r["op_id"], r["state"], r.get("error")) for r in records
    ]
    assert [r["container_id"] for r in records] == pooled  # adopted where they ran, not rerun
    assert [r["attempts"] for r in records] == [1, 1, 1]
    for op_id in ids:
        events = await read_op_events(config.nats.url, op_id, 5)
        assert sum(1 for s in statuses(events) if s in TERMINAL_STATES) == 1
        assert sum(1 for e in events if e["event"] == "result") == 1
    assert our_containers(docker_client) == []


async def test_pooled_ops_get_their_own_credentials_at_assignment(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    no_leftover_containers: None,
) -> None:
    """On an authenticated server a warm container has no credentials while it waits; its
    op's own arrive with the op, and confine it to that op (the probe's isolation check)."""
    from dispatcher.authority import Authority, write_secret
    from dispatcher.config import NatsConfig
    from dispatcher.embedded import EmbeddedNats, free_port
    from tests.test_placement_engines import start

    authority = Authority.load_or_create(tmp_state)
    server = EmbeddedNats(tmp_state / "secured", free_port(), host="0.0.0.0", trust=authority.trust_block())
    await server.start()
    creds = str(write_secret(tmp_state / "tester.creds", authority.mint("submitter", "tester")))
    config = msgspec.structs.replace(config, nats=NatsConfig(url=server.url, embedded=False))
    try:
        async with start(config, runner_image, authority) as (service, _fleet):
            me = service.dispatcher_id
            warm = await until("no warm container", lambda: warm_containers(docker_client, me))
            cid = warm[0]["Id"]
            env = docker_client.api.inspect_container(cid)["Config"]["Env"] or []
            assert not any("KTRDR" in e or "creds" in e.lower() or "jwt" in e.lower() for e in env), env
            job = {
                "job_id": new_id("auth"),
                "kind": "probe",
                "params": {"check_isolation": True},
                "resources": POOLED,
            }
            op_id = await publish_job(config.nats.url, job, creds=creds, submitter="tester")
            record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, 60, creds=creds)
    finally:
        await asyncio.to_thread(server.stop)
    assert record["state"] == "completed", record.get("error")
    assert record["container_id"] == cid  # the warm one
    isolation = record["result"]["isolation"]
    assert isolation and set(isolation.values()) == {"denied"}, isolation


async def test_demand_grows_the_pool_and_idle_containers_expire(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    no_leftover_containers: None,
) -> None:
    """min 0: nothing warm until an op of the shape finds none (it takes the normal path);
    then one is kept, and once it waits idle_ttl_s it goes and the target falls back."""
    from tests.test_placement_engines import start

    lazy = PoolShape(cpus=SHAPE.cpus, memory_gb=SHAPE.memory_gb, min=0, max=2)
    config = msgspec.structs.replace(config, pool=PoolConfig(shapes=[lazy], idle_ttl_s=3.0))
    async with start(config, runner_image) as (service, _fleet):
        me = service.dispatcher_id
        assert not warm_containers(docker_client, me, ready=False)
        op_id = await publish_job(
            config.nats.url, {"job_id": new_id("miss"), "kind": "probe", "resources": POOLED}
        )
        record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, 60)
        assert record["state"] == "completed" and record["container_id"] not in {
            c["Id"] for c in warm_containers(docker_client, me, running_only=False, ready=False)
        }
        await until("the miss did not grow the pool", lambda: warm_containers(docker_client, me), 60)
        await until(
            "the idle container did not expire",
            lambda: not warm_containers(docker_client, me, ready=False),
            30,
        )
