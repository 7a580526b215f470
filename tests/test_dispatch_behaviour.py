"""JetStream setup, the embedded default, capacity and leases — real NATS, real Docker."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import docker
import msgspec
import nats
import pytest

from discovery.docker_engines import engine_host
from dispatcher.config import Config, DispatcherConfig, NatsConfig
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.fleet import Fleet
from dispatcher.jetstream import ensure_jetstream
from dispatcher.service import Dispatcher
from runner.protocol import DISPATCHER_CONSUMER, EVENTS_STREAM, JOBS_STREAM
from tests.conftest import SESSION_TAG, RunningDispatcher, run_cli, write_config
from tests.test_core_path import containers_created, read_op_events

pytestmark = [pytest.mark.nats]


async def test_setup_is_idempotent_from_many_processes_and_updates_stale_config(config: Config) -> None:
    """Five processes set JetStream up at once; a changed config then updates the stream
    and the durable consumer instead of silently keeping the old one."""
    script = (
        "import asyncio,sys,msgspec\n"
        "from dispatcher.config import Config\n"
        "from dispatcher.connection import connect\n"
        "from dispatcher.jetstream import ensure_jetstream\n"
        "async def main():\n"
        "    cfg = msgspec.json.decode(sys.argv[1].encode(), type=Config)\n"
        "    nc = await connect(cfg.nats.url, name='setup')\n"
        "    await ensure_jetstream(nc, cfg, mode='apply')\n"
        "    await nc.close()\n"
        "asyncio.run(main())\n"
    )
    encoded = msgspec.json.encode(config).decode()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, encoded, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(5)
    ]
    results = [await p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-500:] for _out, err in results]

    nc = await connect(config.nats.url, name="check")
    js = nc.jetstream()
    assert (
        await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
    ).config.ack_wait == config.dispatcher.ack_wait_s
    changed = msgspec.structs.replace(
        config,
        dispatcher=msgspec.structs.replace(config.dispatcher, ack_wait_s=42.0),
        retention=msgspec.structs.replace(config.retention, events_s=3600.0),
    )
    await ensure_jetstream(nc, changed, mode="apply")
    assert (await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)).config.ack_wait == 42.0
    assert (await js.stream_info(EVENTS_STREAM)).config.max_age == 3600.0
    await nc.close()


@pytest.mark.docker
async def test_embedded_nats_when_nothing_answers(
    tmp_state: Path, runner_image: str, no_leftover_containers: None
) -> None:
    """With nothing at the configured local URL, a command starts its own nats-server
    (store under the state dir) and stops it when done."""
    port = free_port()
    config = Config(
        state_dir=str(tmp_state),
        nats=NatsConfig(url=f"nats://127.0.0.1:{port}", embedded=True),
        dispatcher=DispatcherConfig(dispatcher_id=f"{SESSION_TAG}-emb"),
    )
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    done = await asyncio.to_thread(run_cli, ["submit", "probe", "--json"], config_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "completed"
    assert (tmp_state / "nats" / "jetstream").is_dir()
    with pytest.raises(OSError):  # the embedded server is gone with the command
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    # the state survives: a second command sees the first op
    done = await asyncio.to_thread(run_cli, ["ops", "list", "--json"], config_path)
    assert len(json.loads(done.stdout)) == 1


@pytest.mark.docker
async def test_work_beyond_capacity_waits_in_jetstream(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    """Ops that together ask more CPUs than the host has run in turn, never together."""
    host_cpus = dispatcher.dispatcher.fleet.hosts()[0].cpus
    per_op = host_cpus / 2  # two fit at once
    ids = [f"cap-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    for op_id in ids:
        job = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 1.5}, "resources": {"cpus": per_op}}
        await js.publish("ktrdr.jobs.probe", json.dumps(job).encode(), headers={"Nats-Msg-Id": op_id})
    await nc.close()
    records = []
    for op_id in ids:
        events = await read_op_events(config.nats.url, op_id, timeout_s=120)
        assert events[-1]["state"] == "completed"
        nc = await nats.connect(config.nats.url)
        entry = await (await nc.jetstream().key_value("ktrdr_ops")).get(op_id)
        records.append(json.loads(entry.value))
        await nc.close()
    intervals = [(r["timestamps"]["running"], r["timestamps"]["completed"]) for r in records]
    for t, _ in intervals:
        overlapping = sum(1 for start, end in intervals if start <= t < end)
        assert overlapping <= 2, intervals


@pytest.mark.docker
async def test_lease_is_kept_alive_past_ack_wait(
    config: Config, tmp_state: Path, runner_image: str, docker_client: docker.DockerClient
) -> None:
    """An op running longer than the consumer's ack wait is not redelivered."""
    short = msgspec.structs.replace(
        config, dispatcher=msgspec.structs.replace(config.dispatcher, ack_wait_s=5.0)
    )
    nc = await connect(short.nats.url, name="lease")
    handles = await ensure_jetstream(nc, short, mode="apply")
    client = connect_docker()
    engine = DockerEngine(client, name="local")
    service = Dispatcher(short, nc, handles, Fleet.single(engine, engine_host(client)), lambda: runner_image)
    task = asyncio.create_task(service.run(idle_s=0.5))
    try:
        op_id = f"lease-{uuid.uuid4().hex[:8]}"
        since = time.time()
        job = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 12}}
        await handles.js.publish("ktrdr.jobs.probe", json.dumps(job).encode(), headers={"Nats-Msg-Id": op_id})
        events = await read_op_events(short.nats.url, op_id, timeout_s=90)
        assert events[-1]["state"] == "completed"
        info = await handles.js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        assert info.num_redelivered == 0
        assert containers_created(docker_client, op_id, since) == 1
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
        await nc.drain()
        engine.close()


def test_schema_command_prints_json_schema(tmp_state: Path) -> None:
    config_path = tmp_state / "none.toml"
    config_path.write_text("")
    done = run_cli(["schema"], config_path)
    doc = json.loads(done.stdout)
    assert "Job" in doc["$defs"] and doc["job"]["$ref"].endswith("/Job")


async def test_embedded_server_listens_where_containers_reach_it(tmp_state: Path) -> None:
    server = EmbeddedNats(tmp_state / "n", free_port(), host="0.0.0.0")
    await server.start()
    try:
        nc = await nats.connect(server.url)
        assert nc.is_connected
        await nc.close()
        assert '"0.0.0.0:' in (tmp_state / "n" / "nats-server.conf").read_text()
    finally:
        server.stop()
