"""The core path against a real dockerd and a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import nats
import pytest
from nats.js import api

from dispatcher.config import Config
from runner.protocol import TERMINAL_STATES
from tests.conftest import RunningDispatcher, creations, run_cli, write_config

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def read_op_events(
    url: str, op_id: str, timeout_s: float = 90.0, *, creds: str = ""
) -> list[dict[str, Any]]:
    """Read an op's events as a plain NATS client would: raw JSON, no ktrdr-run code."""
    nc = await nats.connect(url, **({"user_credentials": creds} if creds else {}))
    js = nc.jetstream()
    events: list[dict[str, Any]] = []
    sub = await js.subscribe(
        f"ktrdr.ops.{op_id}.>", ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=deadline - time.monotonic())
            except TimeoutError:
                break
            event = json.loads(msg.data)
            events.append(event)
            if event["event"] == "status" and event["state"] in TERMINAL_STATES:
                break
    finally:
        await nc.close()
    return events


def containers_created(client: docker.DockerClient, op_id: str, since: float) -> int:
    """How many containers the engine created for ``op_id`` since ``since`` (recorded live
    from the engine's own event stream)."""
    return sum(creations(client).by_attempt(op_id, since).values())


async def test_probe_submit_json_shows_hardening(
    config: Config, tmp_state: Path, runner_image: str, no_leftover_containers: None
) -> None:
    """`ktrdr-run submit probe --json` completes and the probe sees the hardening in effect."""
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    done = await asyncio.to_thread(
        run_cli, ["submit", "probe", "--cpus", "0.5", "--memory-gb", "0.25", "--json"], config_path
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "completed"
    report = record["result"]
    assert report["uid"] == 65534 and report["non_root"] is True
    assert report["read_only_root"] is True
    assert report["scratch_writable"] is True
    assert report["no_capabilities"] is True and report["capabilities_effective"] == "0000000000000000"
    assert report["no_new_privileges"] is True
    # limits as the kernel reports them inside the container, against what was asked
    assert report["memory_limit_bytes"] == int(0.25 * 1024**3)
    assert report["cpu_quota"] == pytest.approx(0.5)
    assert report["pids_limit"] == config.dispatcher.pids_limit
    assert record["exit_code"] == 0
    assert record["image"] == runner_image
    for state in ("queued", "placing", "starting", "running", "completed"):
        assert state in record["timestamps"]


async def test_raw_json_job_from_plain_client(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    """A job published as hand-written JSON by a plain NATS client runs to completion, and
    the same client reads its events back."""
    op_id = new_id("raw")
    since = time.time()
    raw = (
        '{"job_id": "OP_ID", "kind": "probe", "params": {"hold_s": 1.0, "tick_s": 0.25},'
        ' "resources": {"cpus": 0.5, "memory_gb": 0.5}, "submitted_by": "plain-client"}'
    ).replace("OP_ID", op_id)
    nc = await nats.connect(config.nats.url)
    ack = await nc.jetstream().publish("ktrdr.jobs.probe", raw.encode(), headers={"Nats-Msg-Id": op_id})
    assert ack.stream == "KTRDR_JOBS"
    await nc.close()

    events = await read_op_events(config.nats.url, op_id)
    kinds = [e["event"] for e in events]
    states = [e["state"] for e in events if e["event"] == "status"]
    assert states[0] == "queued" and states[-1] == "completed", states
    assert states == ["queued", "placing", "starting", "running", "completed"]
    result = next(e for e in events if e["event"] == "result")
    assert result["result"]["memory_limit_bytes"] == int(0.5 * 1024**3)
    progress = [e["percent"] for e in events if e["event"] == "progress"]
    assert progress and progress[-1] == 100.0
    assert progress == sorted(progress)
    assert kinds.index("result") < len(kinds) - 1  # the result precedes the terminal status
    assert containers_created(docker_client, op_id, since) == 1


async def test_invalid_jobs_are_rejected_without_containers(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    """Not JSON, unknown kind, bad params, bad field: an error event naming the problem, no
    container, and the dispatcher keeps serving valid jobs."""
    since = time.time()
    bad_params_id, unknown_kind_id, bad_resources_id = new_id("badp"), new_id("unk"), new_id("badr")
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    rejected = await js.subscribe(
        "ktrdr.rejected.>", ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
    )
    await js.publish("ktrdr.jobs.probe", b"{not json at all", headers={"Nats-Msg-Id": new_id("nj")})
    await js.publish(
        "ktrdr.jobs.probe",
        json.dumps({"job_id": bad_params_id, "kind": "probe", "params": {"hold_s": "long"}}).encode(),
    )
    await js.publish(
        "ktrdr.jobs.warp_drive", json.dumps({"job_id": unknown_kind_id, "kind": "warp_drive"}).encode()
    )
    await js.publish(
        "ktrdr.jobs.probe",
        json.dumps({"job_id": bad_resources_id, "kind": "probe", "resources": {"cpus": -2}}).encode(),
    )
    seen: list[dict[str, Any]] = []
    for _ in range(4):
        msg = await rejected.next_msg(timeout=30)
        seen.append(json.loads(msg.data))
    by_op = {e["op_id"]: e for e in seen}
    assert any("not valid JSON" in e["message"] for e in seen)
    assert by_op[bad_params_id]["field"] == "params.hold_s"
    assert "params.hold_s" in by_op[bad_params_id]["message"]
    assert by_op[unknown_kind_id]["field"] == "kind"
    assert "unknown kind 'warp_drive'" in by_op[unknown_kind_id]["message"]
    assert by_op[bad_resources_id]["field"] == "resources.cpus"
    assert all(e["reason"] == "invalid_job" for e in seen)

    # the op's own event stream carries the error and a terminal status, for followers
    events = await read_op_events(config.nats.url, bad_params_id, timeout_s=10)
    assert [e["event"] for e in events][-2:] == ["error", "status"]
    assert events[-1]["state"] == "failed"
    await nc.close()

    # still serving: a valid job completes
    good = new_id("good")
    nc = await nats.connect(config.nats.url)
    await nc.jetstream().publish(
        "ktrdr.jobs.probe",
        json.dumps({"job_id": good, "kind": "probe"}).encode(),
        headers={"Nats-Msg-Id": good},
    )
    await nc.close()
    events = await read_op_events(config.nats.url, good)
    assert events[-1]["state"] == "completed"
    assert not dispatcher.task.done()
    for op_id in (bad_params_id, unknown_kind_id, bad_resources_id):
        assert containers_created(docker_client, op_id, since) == 0


async def test_same_job_id_never_starts_a_second_container(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    """Re-publishing a job id — inside the dedupe window, and past it (a new Nats-Msg-Id,
    as after the window expires) — never starts a second container."""
    op_id = new_id("dup")
    since = time.time()
    job = json.dumps({"job_id": op_id, "kind": "probe", "params": {"hold_s": 1.5}}).encode()
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    first = await js.publish("ktrdr.jobs.probe", job, headers={"Nats-Msg-Id": op_id})
    second = await js.publish("ktrdr.jobs.probe", job, headers={"Nats-Msg-Id": op_id})
    assert not first.duplicate and second.duplicate
    await asyncio.sleep(0.5)  # the op is running now
    await js.publish("ktrdr.jobs.probe", job, headers={"Nats-Msg-Id": op_id + "-again"})
    await nc.close()
    events = await read_op_events(config.nats.url, op_id)
    assert events[-1]["state"] == "completed"
    # after completion, once more
    nc = await nats.connect(config.nats.url)
    await nc.jetstream().publish("ktrdr.jobs.probe", job, headers={"Nats-Msg-Id": op_id + "-late"})
    await nc.close()
    await asyncio.sleep(1.5)
    assert containers_created(docker_client, op_id, since) == 1
    statuses = [e for e in await read_op_events(config.nats.url, op_id, 5) if e["event"] == "status"]
    assert [e["state"] for e in statuses].count("completed") == 1


async def test_op_failure_and_cli_reads(
    config: Config, tmp_state: Path, dispatcher: RunningDispatcher
) -> None:
    """A failing op reaches `failed` with its error; `ops list/show/logs` read records."""
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["submit", "probe", "-p", "fail=true", "--json"], config_path)
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "failed"
    assert record["error"]["reason"] == "op_error"
    assert "probe asked to fail" in record["error"]["message"]
    assert "RuntimeError" in record["error"]["traceback"]
    assert record["exit_code"] == 1

    code = await asyncio.to_thread(run_cli, ["submit", "probe", "-p", "exit_code=3", "--json"], config_path)
    assert code.returncode == 1
    assert json.loads(code.stdout)["exit_code"] == 3

    listed = await asyncio.to_thread(run_cli, ["ops", "list", "--json"], config_path)
    ids = [r["op_id"] for r in json.loads(listed.stdout)]
    assert record["op_id"] in ids
    shown = await asyncio.to_thread(run_cli, ["ops", "show", record["op_id"], "--json"], config_path)
    assert json.loads(shown.stdout)["state"] == "failed"
    logs = await asyncio.to_thread(run_cli, ["ops", "logs", record["op_id"]], config_path)
    assert logs.returncode == 0
    assert "probe asked to fail" in logs.stdout
    missing = await asyncio.to_thread(run_cli, ["ops", "show", "no-such-op"], config_path)
    assert missing.returncode == 2 and "no op with id 'no-such-op'" in missing.stderr


async def test_submit_detach_returns_op_id(
    config: Config, tmp_state: Path, dispatcher: RunningDispatcher
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["submit", "probe", "--detach", "--json"], config_path)
    assert done.returncode == 0, done.stderr
    op_id = json.loads(done.stdout)["op_id"]
    events = await read_op_events(config.nats.url, op_id)
    assert events[-1]["state"] == "completed"
