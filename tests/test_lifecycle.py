"""Every op reaches exactly one terminal state, exactly once, whatever happens around it.

Real dockerd, real nats-server, real dispatcher processes where a crash is the point.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import pytest

from discovery.docker_engines import engine_host
from dispatcher.config import Config
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.fleet import Fleet
from dispatcher.jetstream import JetStreamHandles, ensure_jetstream
from dispatcher.service import Dispatcher
from runner.protocol import LABEL_OP_ID, TERMINAL_STATES
from tests.conftest import KTRDR_RUN, SESSION_TAG, RunningDispatcher, our_containers, write_config
from tests.test_core_path import containers_created, read_op_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def publish_job(
    url: str, job: dict[str, Any], msg_id: str | None = None, *, creds: str = "", submitter: str = ""
) -> str:
    """Publish a job as a plain NATS client would (``creds``: a .creds file, if the
    server wants one; a submitter's publishes under its name)."""
    nc = await nats.connect(url, **({"user_credentials": creds} if creds else {}))
    await nc.jetstream().publish(
        f"ktrdr.jobs.{job['kind']}" + (f".{submitter}" if submitter else ""),
        json.dumps(job).encode(),
        headers={"Nats-Msg-Id": msg_id or job["job_id"]},
    )
    await nc.close()
    return str(job["job_id"])


async def publish_cancel(url: str, op_id: str, reason: str = "test") -> float:
    nc = await nats.connect(url)
    sent = time.time()
    await nc.jetstream().publish(
        f"ktrdr.ops.{op_id}.cancel",
        json.dumps({"event": "cancel", "op_id": op_id, "ts": sent, "reason": reason}).encode(),
    )
    await nc.close()
    return sent


async def get_record(url: str, op_id: str, *, creds: str = "") -> dict[str, Any]:
    nc = await nats.connect(url, **({"user_credentials": creds} if creds else {}))
    try:
        entry = await (await nc.jetstream().key_value("ktrdr_ops")).get(op_id)
        return dict(json.loads(entry.value))
    finally:
        await nc.close()


async def wait_for_state(
    url: str, op_id: str, states: AbstractSet[str], timeout_s: float = 60, *, creds: str = ""
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            record = await get_record(url, op_id, creds=creds)
            if record["state"] in states:
                return record
        except Exception:  # noqa: BLE001 - not created yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"op {op_id} did not reach {states} within {timeout_s}s")


async def assert_container_removed(
    client: docker.DockerClient, container_id: str, timeout_s: float = 5
) -> None:
    """The container is removed right after the op's outcome is recorded."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.containers.get(container_id)
        except docker.errors.NotFound:
            return
        assert time.monotonic() < deadline, f"container {container_id[:12]} still exists"
        await asyncio.sleep(0.1)


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e["event"] == "status"]


# --- cancel -----------------------------------------------------------------------------


async def test_cancel_running_op_is_acknowledged(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    op_id = await publish_job(
        config.nats.url, {"job_id": new_id("cx"), "kind": "probe", "params": {"hold_s": 60}}
    )
    running = await wait_for_state(config.nats.url, op_id, {"running"})
    await asyncio.sleep(0.5)
    await publish_cancel(config.nats.url, op_id, "changed my mind")
    events = await read_op_events(config.nats.url, op_id)
    assert statuses(events)[-1] == "cancelled"
    assert statuses(events).count("cancelled") == 1
    ack = next(e for e in events if e["event"] == "cancel_ack")
    assert "changed my mind" in ack["message"]
    record = await get_record(config.nats.url, op_id)
    assert record["cancel"]["acked"] is True and record["cancel"]["forced"] is False
    assert record["cancel"]["reason"] == "changed my mind"
    await assert_container_removed(docker_client, running["container_id"])


async def test_cancel_of_a_deaf_runner_is_forced_within_grace(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    grace_s = config.dispatcher.cancel_grace_s
    job = {"job_id": new_id("deaf"), "kind": "probe", "params": {"hold_s": 120, "ignore_cancel": True}}
    op_id = await publish_job(config.nats.url, job)
    running = await wait_for_state(config.nats.url, op_id, {"running"})
    sent = await publish_cancel(config.nats.url, op_id)
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=grace_s + 30)
    ended = record["timestamps"]["cancelled"]
    assert record["state"] == "cancelled"
    assert record["cancel"]["forced"] is True and record["cancel"]["acked"] is False
    assert ended - sent <= grace_s + 2.0 + 1.0, ended - sent  # grace, SIGTERM→SIGKILL 2 s, bookkeeping
    await assert_container_removed(docker_client, running["container_id"])


async def test_cancel_of_a_queued_op_never_creates_a_container(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    cpus = dispatcher.dispatcher.fleet.hosts()[0].cpus
    since = time.time()
    blocker = await publish_job(
        config.nats.url,
        {"job_id": new_id("blk"), "kind": "probe", "params": {"hold_s": 6}, "resources": {"cpus": cpus}},
    )
    await wait_for_state(config.nats.url, blocker, {"running"})
    waiting = await publish_job(config.nats.url, {"job_id": new_id("q"), "kind": "probe"})
    await wait_for_state(config.nats.url, waiting, {"queued"})
    await publish_cancel(config.nats.url, waiting)
    record = await wait_for_state(config.nats.url, waiting, TERMINAL_STATES)
    assert record["state"] == "cancelled"
    # a cancel for a job nobody has seen yet: it is still never started
    unseen = new_id("unseen")
    await publish_cancel(config.nats.url, unseen)
    await publish_job(config.nats.url, {"job_id": unseen, "kind": "probe"})
    assert (await wait_for_state(config.nats.url, unseen, TERMINAL_STATES))["state"] == "cancelled"
    await wait_for_state(config.nats.url, blocker, TERMINAL_STATES)
    await asyncio.sleep(1.5)
    assert containers_created(docker_client, waiting, since) == 0
    assert containers_created(docker_client, unseen, since) == 0


async def test_cancel_of_a_finished_op_is_a_clear_no_op(
    config: Config, tmp_state: Path, dispatcher: RunningDispatcher
) -> None:
    from tests.conftest import run_cli

    op_id = await publish_job(config.nats.url, {"job_id": new_id("fin"), "kind": "probe"})
    await wait_for_state(config.nats.url, op_id, {"completed"})
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["ops", "cancel", op_id], config_path)
    assert done.returncode == 0
    assert "already finished (completed); nothing to cancel" in done.stdout
    assert (await get_record(config.nats.url, op_id))["state"] == "completed"


# --- timeouts and failures --------------------------------------------------------------


async def test_timeout_is_enforced_by_the_dispatcher(config: Config, dispatcher: RunningDispatcher) -> None:
    job = {"job_id": new_id("to"), "kind": "probe", "params": {"hold_s": 60}, "timeout_s": 2}
    op_id = await publish_job(config.nats.url, job)
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=60)
    assert record["state"] == "timed_out"
    assert record["error"]["reason"] == "timeout"
    took = record["timestamps"]["timed_out"] - record["timestamps"]["running"]
    assert 2.0 <= took <= 2.0 + config.dispatcher.cancel_grace_s + 3.0


async def test_exit_code_is_a_failure_with_log_tail(config: Config, dispatcher: RunningDispatcher) -> None:
    op_id = await publish_job(
        config.nats.url, {"job_id": new_id("ex"), "kind": "probe", "params": {"exit_code": 3}}
    )
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES)
    assert record["state"] == "failed"
    assert record["exit_code"] == 3
    assert record["error"]["reason"] == "exit_nonzero"
    assert any("probe exiting with code 3" in line for line in record["log_tail"])


async def test_oom_kill_is_told_apart(config: Config, dispatcher: RunningDispatcher) -> None:
    job = {
        "job_id": new_id("oom"),
        "kind": "probe",
        "params": {"allocate_mb": 400},
        "resources": {"memory_gb": 0.125},
    }
    op_id = await publish_job(config.nats.url, job)
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES)
    assert record["state"] == "failed"
    assert record["error"]["reason"] == "oom_killed", record["error"]
    assert record["exit_code"] == 137


async def test_infrastructure_failures_retry_with_backoff_then_fail(
    config: Config, runner_image: str, docker_client: docker.DockerClient, no_leftover_containers: None
) -> None:
    """A missing image is retried (with the image looked up again), up to max_attempts."""
    calls: list[str] = []

    def flaky_image() -> str:
        calls.append("x")
        return "ktrdr-runner:no-such-image" if len(calls) == 1 else runner_image

    def missing_image() -> str:
        return "ktrdr-runner:no-such-image"

    async with running_dispatcher(config, flaky_image, "flaky") as _:
        op_id = await publish_job(config.nats.url, {"job_id": new_id("retry"), "kind": "probe"})
        record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=60)
        assert record["state"] == "completed"
        assert record["attempts"] == 2
        assert "queued" in statuses(await read_op_events(config.nats.url, op_id, 5))[1:]
    async with running_dispatcher(config, missing_image, "missing") as _:
        op_id = await publish_job(config.nats.url, {"job_id": new_id("noimg"), "kind": "probe"})
        record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=60)
        assert record["state"] == "failed"
        assert record["attempts"] == config.dispatcher.max_attempts
        assert record["error"]["reason"] == "infrastructure"
        assert "no-such-image" in record["error"]["message"]
        events = await read_op_events(config.nats.url, op_id, 5)
        placing = [e["ts"] for e in events if e["event"] == "status" and e["state"] == "placing"]
        gaps = [b - a for a, b in itertools.pairwise(placing)]
        assert len(placing) == 3 and gaps[1] > gaps[0] * 1.5, gaps  # backoff grows


async def test_op_exception_is_not_retried(config: Config, dispatcher: RunningDispatcher) -> None:
    op_id = await publish_job(
        config.nats.url, {"job_id": new_id("boom"), "kind": "probe", "params": {"fail": True}}
    )
    record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES)
    assert record["state"] == "failed" and record["attempts"] == 1
    assert record["error"]["reason"] == "op_error"


# --- poison messages, logs, retention ---------------------------------------------------


async def test_poison_message_goes_to_dead_letter_and_the_queue_moves_on(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    poison = new_id("poison")
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    kv = await js.key_value("ktrdr_ops")
    await kv.put(poison, b"\x00 this is not an op record")  # makes every delivery fail
    dead = await js.subscribe("ktrdr.dead.>", ordered_consumer=True)
    await js.publish("ktrdr.jobs.probe", json.dumps({"job_id": poison, "kind": "probe"}).encode())
    letter = json.loads((await dead.next_msg(timeout=60)).data)
    assert letter["job_id"] == poison
    assert letter["deliveries"] >= config.dispatcher.poison_after_failures
    assert "DecodeError" in letter["reason"] or "decode" in letter["reason"].lower()
    await nc.close()
    good = await publish_job(config.nats.url, {"job_id": new_id("after"), "kind": "probe"})
    assert (await wait_for_state(config.nats.url, good, TERMINAL_STATES))["state"] == "completed"


async def test_logs_follow_during_and_after_the_op(
    config: Config, tmp_state: Path, dispatcher: RunningDispatcher
) -> None:
    op_id = await publish_job(
        config.nats.url, {"job_id": new_id("logs"), "kind": "probe", "params": {"hold_s": 3}}
    )
    await wait_for_state(config.nats.url, op_id, {"running"})
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    env = {**os.environ, "KTRDR_RUN_CONFIG": str(config_path)}
    follow = await asyncio.create_subprocess_exec(
        KTRDR_RUN, "ops", "logs", op_id, "--follow", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(follow.communicate(), 60)
    assert follow.returncode == 0
    assert (await get_record(config.nats.url, op_id))["state"] == "completed"  # --follow ran to the end
    assert "probe: uid=65534 read_only_root=True" in out.decode()
    after = await asyncio.create_subprocess_exec(
        KTRDR_RUN, "ops", "logs", op_id, env=env, stdout=asyncio.subprocess.PIPE
    )
    out_after, _ = await after.communicate()
    assert "probe: uid=65534" in out_after.decode()


async def test_finished_ops_expire_by_jetstream_limits(
    config: Config, runner_image: str, no_leftover_containers: None
) -> None:
    short = msgspec.structs.replace(
        config, retention=msgspec.structs.replace(config.retention, ops_s=2.0, events_s=3.0)
    )
    async with running_dispatcher(short, lambda: runner_image, "ret"):
        op_id = await publish_job(short.nats.url, {"job_id": new_id("ret"), "kind": "probe"})
        await wait_for_state(short.nats.url, op_id, {"completed"})
        nc = await nats.connect(short.nats.url)
        kv = await nc.jetstream().key_value("ktrdr_ops")
        deadline = time.monotonic() + 20
        gone = False
        while time.monotonic() < deadline and not gone:
            await asyncio.sleep(0.5)
            try:
                await kv.get(op_id)
            except Exception:  # noqa: BLE001 - KeyNotFoundError: expired
                gone = True
        assert gone, "the finished op record did not expire"
        info = await nc.jetstream().stream_info("KTRDR_EVENTS")
        assert info.config.max_age == 3.0
        await nc.close()


# --- crashes and outages ----------------------------------------------------------------


class running_dispatcher:
    """An in-process Dispatcher for the duration of an ``async with``."""

    def __init__(self, config: Config, image: Any, suffix: str) -> None:
        self.config = msgspec.structs.replace(
            config,
            dispatcher=msgspec.structs.replace(config.dispatcher, dispatcher_id=f"{SESSION_TAG}-{suffix}"),
        )
        self.image = image

    async def __aenter__(self) -> Dispatcher:
        self.nc = await connect(self.config.nats.url, name="test")
        handles = await ensure_jetstream(self.nc, self.config, mode="apply")
        client = connect_docker()
        self.engine = DockerEngine(client, name="local")
        fleet = Fleet.single(self.engine, engine_host(client))
        self.service = Dispatcher(self.config, self.nc, handles, fleet, self.image)
        self.task = asyncio.create_task(self.service.run(idle_s=0.3))
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, 120)
        await self.nc.drain()
        self.engine.close()


def process_config(config: Config, tmp_state: Path, suffix: str) -> Path:
    """A config file for dispatcher processes with their own id (leftover checks see it)."""
    named = msgspec.structs.replace(
        config, dispatcher=msgspec.structs.replace(config.dispatcher, dispatcher_id=f"{SESSION_TAG}-{suffix}")
    )
    return write_config(named, tmp_state / "ktrdr-run.toml")


def start_dispatcher_process(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KTRDR_RUN_CONFIG": str(config_path)}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [KTRDR_RUN, "-v", "dispatcher"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def test_dispatcher_kill_9_and_restart_loses_nothing(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    no_leftover_containers: None,
    js_handles: JetStreamHandles,
) -> None:
    config_path = process_config(config, tmp_state, "crash")
    first = start_dispatcher_process(config_path, tmp_state / "dispatcher-1.log")
    since = time.time()
    try:
        ids = [new_id("k9") for _ in range(10)]
        for i, op_id in enumerate(ids):
            hold = 4 + (i % 3) * 2  # some finish while no dispatcher runs, some after the restart
            job = {
                "job_id": op_id,
                "kind": "probe",
                "params": {"hold_s": hold},
                "resources": {"cpus": 0.1, "memory_gb": 0.25},
            }
            await publish_job(config.nats.url, job)
        for op_id in ids:
            await wait_for_state(config.nats.url, op_id, {"running"}, timeout_s=120)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        await asyncio.sleep(5)  # some containers exit while nobody watches
        second = start_dispatcher_process(config_path, tmp_state / "dispatcher-2.log")
        try:
            records = [
                await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=120) for op_id in ids
            ]
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["state"] for r in records] == ["completed"] * 10, [
        (r["op_id"], r["state"], r.get("error")) for r in records
    ]
    for op_id in ids:
        assert containers_created(docker_client, op_id, since) == 1
        events = await read_op_events(config.nats.url, op_id, 5)
        assert sum(1 for s in statuses(events) if s in TERMINAL_STATES) == 1
    assert our_containers(docker_client) == []


async def test_nats_outage_mid_run_loses_no_result(
    config: Config, nats_server: EmbeddedNats, dispatcher: RunningDispatcher
) -> None:
    ids = [new_id("out") for _ in range(4)]
    for op_id in ids:
        await publish_job(
            config.nats.url,
            {"job_id": op_id, "kind": "probe", "params": {"hold_s": 8}, "resources": {"cpus": 0.2}},
        )
    for op_id in ids:
        await wait_for_state(config.nats.url, op_id, {"running"}, timeout_s=60)
    await asyncio.sleep(1)
    await asyncio.to_thread(nats_server.stop)
    await asyncio.sleep(5)
    await nats_server.start()
    records = [await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=120) for op_id in ids]
    assert [r["state"] for r in records] == ["completed"] * 4, [r.get("error") for r in records]
    assert all(r["result"]["non_root"] is True for r in records)


async def test_two_dispatchers_share_the_queue_without_duplicates(
    config: Config, runner_image: str, docker_client: docker.DockerClient, no_leftover_containers: None
) -> None:
    since = time.time()
    ids = [new_id("two") for _ in range(30)]
    async with (
        running_dispatcher(config, lambda: runner_image, "one") as a,
        running_dispatcher(config, lambda: runner_image, "two") as b,
    ):
        nc = await nats.connect(config.nats.url)
        js = nc.jetstream()
        for op_id in ids:
            job = {"job_id": op_id, "kind": "probe", "resources": {"cpus": 0.1, "memory_gb": 0.125}}
            await js.publish("ktrdr.jobs.probe", json.dumps(job).encode(), headers={"Nats-Msg-Id": op_id})
            # and once more under another message id: the KV claim must stop the duplicate
            await js.publish(
                "ktrdr.jobs.probe", json.dumps(job).encode(), headers={"Nats-Msg-Id": op_id + "-b"}
            )
        await nc.close()
        records = [
            await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=180) for op_id in ids
        ]
        owners = {r["dispatcher"] for r in records}
        assert a.dispatcher_id in owners and b.dispatcher_id in owners
    assert [r["state"] for r in records] == ["completed"] * 30
    created = {op_id: containers_created(docker_client, op_id, since) for op_id in ids}
    assert set(created.values()) == {1}, created
    leftover = docker_client.containers.list(all=True, filters={"label": LABEL_OP_ID})
    assert not [c for c in leftover if c.labels.get(LABEL_OP_ID) in ids]


async def test_cancel_published_while_the_dispatcher_is_down_survives_its_restart(
    config: Config,
    tmp_state: Path,
    runner_image: str,
    docker_client: docker.DockerClient,
    no_leftover_containers: None,
    js_handles: JetStreamHandles,
) -> None:
    config_path = process_config(config, tmp_state, "down")
    first = start_dispatcher_process(config_path, tmp_state / "dispatcher-1.log")
    try:
        job = {
            "job_id": new_id("dur"),
            "kind": "probe",
            "params": {"hold_s": 120},
            "resources": {"cpus": 0.2},
        }
        op_id = await publish_job(config.nats.url, job)
        await wait_for_state(config.nats.url, op_id, {"running"}, timeout_s=60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        await publish_cancel(config.nats.url, op_id, "while nobody watched")
        await asyncio.sleep(1)
        second = start_dispatcher_process(config_path, tmp_state / "dispatcher-2.log")
        try:
            record = await wait_for_state(config.nats.url, op_id, TERMINAL_STATES, timeout_s=60)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert record["state"] == "cancelled"
    assert record["cancel"]["acked"] is True
    assert record["cancel"]["reason"] == "while nobody watched"
