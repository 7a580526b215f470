"""Only the service configures JetStream: real nats-server, the CLI as real subprocesses.

`ktrdr-run dispatcher` and `ktrdr-run setup` create and update streams, buckets, the
object store and the dispatchers' consumer. Read-only commands only bind (and say where
their config differs); submitting commands may create what is missing, never update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dispatcher.config import Config, RetentionConfig
from dispatcher.connection import connect
from dispatcher.jetstream import ensure_jetstream
from runner.protocol import (
    ARTIFACTS_BUCKET,
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    DISPATCHERS_BUCKET,
    EVENTS_STREAM,
    HOSTS_BUCKET,
    JOBS_STREAM,
    OPS_BUCKET,
    RESERVATIONS_BUCKET,
    LogEvent,
    OpRecord,
    ProgressEvent,
    StatusEvent,
    encode,
    op_subject,
)
from tests.conftest import run_cli, write_config

pytestmark = [pytest.mark.nats]

STREAMS = [
    JOBS_STREAM,
    EVENTS_STREAM,
    DEAD_LETTER_STREAM,
    *(f"KV_{bucket}" for bucket in (OPS_BUCKET, HOSTS_BUCKET, RESERVATIONS_BUCKET, DISPATCHERS_BUCKET)),
    f"OBJ_{ARTIFACTS_BUCKET}",
]
ONLY_SERVICE = "only `ktrdr-run dispatcher` or `ktrdr-run setup` changes it"


def differing(config: Config) -> Config:
    """``config`` with other retention and ack wait: what the user's stray config had."""
    return msgspec.structs.replace(
        config,
        retention=RetentionConfig(ops_s=120.0, events_s=60.0, artifacts_s=3600.0, dead_letter_s=86_400.0),
        dispatcher=msgspec.structs.replace(config.dispatcher, ack_wait_s=45.0),
    )


async def server_state(url: str) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """Every stream's config, every stream's message count, the consumer's config."""
    nc = await connect(url, name="check")
    try:
        js = nc.jetstream()
        configs: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for name in STREAMS:
            info = await js.stream_info(name)
            configs[name] = dataclasses.asdict(info.config)
            counts[name] = info.state.messages
        consumer = dataclasses.asdict((await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)).config)
        return configs, counts, consumer
    finally:
        await nc.close()


async def populate(config: Config, op_id: str) -> None:
    """Set up with ``config`` (as the service does) and store an op: record, events, artifact."""
    nc = await connect(config.nats.url, name="populate")
    handles = await ensure_jetstream(nc, config, mode="apply")
    ts = time.time()
    record = OpRecord(
        op_id=op_id, kind="probe", state="completed", timestamps={"queued": ts, "completed": ts}
    )
    await handles.ops.put(op_id, encode(record))
    events = [
        StatusEvent(op_id=op_id, ts=ts, state="queued"),
        ProgressEvent(op_id=op_id, ts=ts, percent=50.0),
        LogEvent(op_id=op_id, ts=ts, message="hello"),
        StatusEvent(op_id=op_id, ts=ts, state="completed"),
    ]
    for event in events:
        await handles.js.publish(op_subject(op_id, event.__struct_config__.tag), encode(event))  # type: ignore[arg-type]
    await handles.artifacts.put("sha256-test", b"artifact bytes")
    await nc.close()


async def test_commands_other_than_the_service_change_nothing(config: Config, tmp_path: Path) -> None:
    op_id = "setup-probe-1"
    await populate(config, op_id)
    configs, counts, consumer = await server_state(config.nats.url)
    assert counts[EVENTS_STREAM] == 4 and counts[f"KV_{OPS_BUCKET}"] == 1

    stray = write_config(differing(config), tmp_path / "stray.toml")
    commands = [
        ["ops", "list"],
        ["ops", "list", "--json"],
        ["ops", "show", op_id],
        ["ops", "logs", op_id],
        ["hosts", "--json"],
        ["submit", "probe", "--detach"],
    ]
    for args in commands:
        done = await asyncio.to_thread(run_cli, args, stray)
        assert done.returncode == 0, (args, done.stderr)
        for line in (
            "note: stream KTRDR_EVENTS keeps events for 14d on the server; this config says 60s "
            f"([retention] events_s) — {ONLY_SERVICE}",
            "note: object store ktrdr_artifacts keeps artifacts for 30d on the server; this config says "
            f"1h ([retention] artifacts_s) — {ONLY_SERVICE}",
            "note: consumer ktrdr-dispatcher waits 10s for an ack on the server; this config says 45s "
            f"([dispatcher] ack_wait_s) — {ONLY_SERVICE}",
        ):
            assert line in done.stderr.splitlines(), (args, done.stderr)
        after_configs, after_counts, after_consumer = await server_state(config.nats.url)
        assert after_configs == configs, args
        assert after_consumer == consumer, args
        assert all(after_counts[name] >= counts[name] for name in STREAMS), (args, counts, after_counts)
        counts = after_counts
        if args[0] == "ops" and args[1] == "list" and "--json" in args:
            assert [r["op_id"] for r in json.loads(done.stdout)] == [op_id]
    assert counts[JOBS_STREAM] == 1  # the detached submit was stored, waiting for a dispatcher
    # ops_s is a per-message TTL on finished records, not a server setting: nothing to report
    assert "ops_s" not in done.stderr

    # the same commands with the config the server was set up with say nothing
    same = write_config(config, tmp_path / "same.toml")
    done = await asyncio.to_thread(run_cli, ["ops", "list"], same)
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr


async def test_read_only_command_on_an_empty_server_fails_and_creates_nothing(
    config: Config, tmp_path: Path
) -> None:
    path = write_config(config, tmp_path / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["ops", "list"], path)
    assert done.returncode == 3, done.stderr
    assert (
        f"no ktrdr-run streams on the NATS server at {config.nats.url}: "
        "start `ktrdr-run dispatcher` or run `ktrdr-run setup`"
    ) in done.stderr
    nc = await connect(config.nats.url, name="check")
    try:
        assert await nc.jetstream().streams_info() == []
    finally:
        await nc.close()


async def test_submit_creates_what_is_missing(config: Config, tmp_path: Path) -> None:
    """A fresh server has nothing: a submitting command creates it (then binds as usual)."""
    path = write_config(config, tmp_path / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["submit", "probe", "--detach", "--json"], path)
    assert done.returncode == 0, done.stderr
    _configs, counts, consumer = await server_state(config.nats.url)
    assert counts[JOBS_STREAM] == 1
    assert consumer["ack_wait"] == config.dispatcher.ack_wait_s


async def test_setup_applies_the_config_and_says_what_it_changed(config: Config, tmp_path: Path) -> None:
    await populate(config, "setup-probe-2")
    _configs, counts, _consumer = await server_state(config.nats.url)
    stray = write_config(differing(config), tmp_path / "stray.toml")

    done = await asyncio.to_thread(run_cli, ["setup"], stray)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "JetStream: updated stream KTRDR_EVENTS now keeps events for 60s, was 14d ([retention] events_s)",
        "JetStream: updated stream KTRDR_DEAD now keeps dead-lettered jobs for 1d, was 30d "
        "([retention] dead_letter_s)",
        "JetStream: updated object store ktrdr_artifacts now keeps artifacts for 1h, was 30d "
        "([retention] artifacts_s)",
        "JetStream: updated consumer ktrdr-dispatcher now waits 45s for an ack, was 10s "
        "([dispatcher] ack_wait_s)",
    ]

    configs, after_counts, consumer = await server_state(config.nats.url)
    assert configs[EVENTS_STREAM]["max_age"] == 60.0
    assert configs[f"OBJ_{ARTIFACTS_BUCKET}"]["max_age"] == 3600.0
    assert configs[DEAD_LETTER_STREAM]["max_age"] == 86_400.0
    assert consumer["ack_wait"] == 45.0
    assert after_counts == counts  # nothing was old enough to go

    done = await asyncio.to_thread(run_cli, ["setup", "--json"], stray)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["updated"] == [] and json.loads(done.stdout)["created"] == []
    # and now the stray config no longer differs: no notes
    done = await asyncio.to_thread(run_cli, ["ops", "list"], stray)
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr


async def test_setup_on_an_empty_server_creates_everything(config: Config, tmp_path: Path) -> None:
    path = write_config(config, tmp_path / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["setup", "--json"], path)
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)["created"]
    assert created == [
        f"stream {JOBS_STREAM}",
        f"stream {EVENTS_STREAM}",
        f"stream {DEAD_LETTER_STREAM}",
        f"KV {OPS_BUCKET}",
        f"KV {HOSTS_BUCKET}",
        f"KV {RESERVATIONS_BUCKET}",
        f"KV {DISPATCHERS_BUCKET}",
        f"object store {ARTIFACTS_BUCKET}",
        f"consumer {DISPATCHER_CONSUMER}",
    ]
    configs, _counts, _consumer = await server_state(config.nats.url)
    kv = configs[f"KV_{DISPATCHERS_BUCKET}"]
    assert kv["max_msgs_per_subject"] == 1 and kv["allow_msg_ttl"] is True


async def test_bind_reports_drift_and_changes_nothing(config: Config) -> None:
    """ensure_jetstream itself: "bind" and "create" report the difference, "apply" fixes it."""
    nc = await connect(config.nats.url, name="modes")
    try:
        await ensure_jetstream(nc, config, mode="apply")
        before = await server_state(config.nats.url)
        other = differing(config)
        for mode in ("bind", "create"):
            handles = await ensure_jetstream(nc, other, mode=mode)
            assert len(handles.drift) == 4 and not handles.created and not handles.updated, handles.drift
            assert await server_state(config.nats.url) == before
        handles = await ensure_jetstream(nc, other, mode="apply")
        assert len(handles.updated) == 4
        handles = await ensure_jetstream(nc, other, mode="bind")
        assert handles.drift == [] and handles.dispatchers is not None
    finally:
        await nc.close()
