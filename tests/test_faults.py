"""The fault suite: every op ends exactly once, whatever fails around it.

Each scenario injects the real fault at its worst, in separate processes, against a real
dockerd and a real nats-server (harness and invariants: :mod:`tests.faults`):

- kill -9 of a dispatcher under 10 running ops; a dispatcher with a new id takes over;
- two dispatcher processes, one frozen (SIGSTOP) until the other declares it dead, then
  thawed (SIGCONT): it must let go, not finish the ops a second time;
- nats-server killed (-9) and restarted mid-run, then an outage longer than ack_wait and
  than the dispatcher lease;
- a second Docker engine frozen (SIGSTOP of its dockerd: connections stay open, nothing
  answers): its ops become lost and complete on the other engine; its leftover
  containers are reaped once it answers again;
- a requeued op whose job no longer passes admission ends failed, with the reason;
- a runner that cannot reach NATS (nats-server on 127.0.0.1 only) ends failed,
  runner_unreachable, within runner_ready_s, and the message names the URL;
- a job that kills the dispatcher process each time it is handled is dead-lettered after
  poison_after_failures deliveries across restarts, and the queue moves on;
- a one-shot command with other people's work queued runs only its own op.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import pytest

from discovery.config import DiscoveryConfig, EngineConfig
from dispatcher.config import Config
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import RUNNER_NETWORK
from dispatcher.jetstream import JetStreamHandles, ensure_jetstream
from runner.protocol import TERMINAL_STATES
from tests.conftest import run_cli, write_config
from tests.faults import (
    DispatcherProcess,
    all_events,
    assert_exactly_once,
    fault_config,
    publish_jobs,
    python_argv,
    records,
    wait_states,
)
from tests.second_dockerd import SecondDockerd, second_dockerd_fixture  # noqa: F401 - fixture

pytestmark = [pytest.mark.docker, pytest.mark.nats]

REPO = Path(__file__).resolve().parent.parent


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def probe(prefix: str, hold_s: float, cpus: float = 0.1, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": new_id(prefix),
        "kind": "probe",
        "params": {"hold_s": hold_s},
        "resources": {"cpus": cpus, "memory_gb": 0.25},
        **extra,
    }


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e["event"] == "status"]


async def test_kill_9_under_ten_running_ops_then_a_new_dispatcher_takes_over(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    since = time.time()
    first = DispatcherProcess(fault_config(config, "k9-first"), tmp_state, "first").start()
    second = DispatcherProcess(fault_config(config, "k9-second"), tmp_state, "second")
    try:
        # some finish while no dispatcher runs, some after the take-over
        ids = await publish_jobs(url, [probe("k9", 4 + (i % 3) * 3) for i in range(10)])
        await wait_states(url, ids, {"running"}, 120, why=first.log_tail())
        first.kill()
        await asyncio.sleep(4)  # the fault itself: nobody watches these ops for 4 s
        second.start()
        final = await wait_states(url, ids, TERMINAL_STATES, 120, why=second.log_tail())
    finally:
        first.kill()
        second.stop()
    assert [r["state"] for r in final.values()] == ["completed"] * 10, [
        (r["op_id"], r["state"], r.get("error")) for r in final.values()
    ]
    # adopted, not re-run: the new dispatcher owns every op, on its first attempt
    assert {r["dispatcher"] for r in final.values()} == {second.dispatcher_id}
    assert {r["attempts"] for r in final.values()} == {1}
    await assert_exactly_once(url, ids, [docker_client], since)


async def test_a_frozen_dispatcher_is_taken_over_and_lets_go_when_it_thaws(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    since = time.time()
    frozen = DispatcherProcess(fault_config(config, "freeze-a"), tmp_state, "a").start()
    other = DispatcherProcess(fault_config(config, "freeze-b"), tmp_state, "b")
    try:
        ids_a = await publish_jobs(url, [probe("fa", 12) for _ in range(6)])
        await wait_states(url, ids_a, {"running"}, 120, why=frozen.log_tail())
        other.start()
        ids_b = await publish_jobs(url, [probe("fb", 3) for _ in range(2)])
        frozen.signal(signal.SIGSTOP)
        # the other declares it dead (its lease expired) and takes its ops over
        deadline = time.monotonic() + 30
        while True:
            owners = {r["dispatcher"] for r in (await records(url, ids_a)).values()}
            if owners == {other.dispatcher_id}:
                break
            assert time.monotonic() < deadline, (owners, other.log_tail())
            await asyncio.sleep(0.2)
        frozen.signal(signal.SIGCONT)
        final = await wait_states(url, ids_a + ids_b, TERMINAL_STATES, 120, why=other.log_tail())
        assert frozen.alive(), frozen.log_tail()  # it carried on, without touching the ops
    finally:
        frozen.signal(signal.SIGCONT) if frozen.alive() else None
        frozen.stop()
        other.stop()
    assert [r["state"] for r in final.values()] == ["completed"] * 8, [
        (r["op_id"], r["state"], r.get("error")) for r in final.values()
    ]
    assert {final[op]["dispatcher"] for op in ids_a} == {other.dispatcher_id}
    assert "letting go" in frozen.log_path.read_text() or "lease lapsed" in frozen.log_path.read_text()
    await assert_exactly_once(url, ids_a + ids_b, [docker_client], since)


async def test_nats_killed_and_restarted_then_a_long_outage(
    config: Config, tmp_state: Path, docker_client: docker.DockerClient, no_leftover_containers: None
) -> None:
    # every acknowledged write is on disk (the server is killed, not stopped)
    server = EmbeddedNats(tmp_state / "nats-sync", free_port(), sync_always=True, host="0.0.0.0")
    await server.start()
    cfg = fault_config(
        msgspec.structs.replace(config, nats=msgspec.structs.replace(config.nats, url=server.url)), "nats"
    )
    nc = await connect(server.url, name="test")
    await ensure_jetstream(nc, cfg, mode="apply")
    await nc.drain()
    since = time.time()
    dispatcher = DispatcherProcess(cfg, tmp_state, "nats-outage").start()
    try:
        # four run at once (0.5 CPU each on this host's 2), two wait for capacity: their
        # job messages are held while NATS goes away
        running = await publish_jobs(server.url, [probe("nr", 10, cpus=0.5) for _ in range(4)])
        await wait_states(server.url, running, {"running"}, 120, why=dispatcher.log_tail())
        waiting = await publish_jobs(server.url, [probe("nw", 2, cpus=0.5) for _ in range(2)])
        await asyncio.sleep(1)
        assert server.process is not None
        server.process.kill()  # kill -9, then back at once
        server.process.wait()
        await server.start()
        await asyncio.sleep(2)
        server.process.kill()  # and now an outage longer than ack_wait_s and lease_s
        server.process.wait()
        await asyncio.sleep(cfg.dispatcher.ack_wait_s + 3)
        await server.start()
        ids = running + waiting
        final = await wait_states(server.url, ids, TERMINAL_STATES, 150, why=dispatcher.log_tail())
        assert [r["state"] for r in final.values()] == ["completed"] * 6, [
            (r["op_id"], r["state"], r.get("error")) for r in final.values()
        ]
        assert all(r["result"]["non_root"] is True for r in final.values())
        await assert_exactly_once(server.url, ids, [docker_client], since)
    finally:
        dispatcher.stop()
        await asyncio.to_thread(server.stop)


async def test_a_frozen_engine_loses_its_ops_to_the_other_and_is_reaped_when_it_thaws(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    second_dockerd: SecondDockerd,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    engine2 = EngineConfig(
        name="engine-2",
        url=second_dockerd.tcp_url,
        tls_ca=str(second_dockerd.ca),
        tls_cert=str(second_dockerd.client_cert),
        tls_key=str(second_dockerd.client_key),
        timeout_s=3.0,
    )
    discovery = DiscoveryConfig(engines=[engine2], health_interval_s=1.0, failure_threshold=2)
    cfg = fault_config(msgspec.structs.replace(config, discovery=discovery), "engine")
    client2 = second_dockerd.client()
    since = time.time()
    dispatcher = DispatcherProcess(cfg, tmp_state, "engines").start()
    frozen_at = 0.0
    try:
        ids = await publish_jobs(url, [probe("eng", 15, cpus=0.25) for _ in range(6)])
        running = await wait_states(url, ids, {"running"}, 120, why=dispatcher.log_tail())
        on_frozen = [op for op, r in running.items() if r["host"] == "engine-2"]
        assert on_frozen and len(on_frozen) < len(ids), {op: r["host"] for op, r in running.items()}
        os.kill(second_dockerd.process.pid, signal.SIGSTOP)  # silent: sockets stay open
        frozen_at = time.time()
        final = await wait_states(url, ids, TERMINAL_STATES, 120, why=dispatcher.log_tail())
        lost_after: dict[str, float] = {}
        for op in on_frozen:
            events = await all_events(url, op)
            lost = next(e["ts"] for e in events if e["event"] == "status" and e["state"] == "lost")
            lost_after[op] = lost - frozen_at
        os.kill(second_dockerd.process.pid, signal.SIGCONT)
        frozen_at = 0.0
        assert [r["state"] for r in final.values()] == ["completed"] * 6, [
            (r["op_id"], r["state"], r.get("error")) for r in final.values()
        ]
        for op in on_frozen:  # completed on the other engine, on a second attempt
            assert final[op]["host"] != "engine-2" and final[op]["attempts"] == 2, final[op]
        # health threshold: failure_threshold checks of (interval + engine timeout) each
        bound_s = discovery.failure_threshold * (discovery.health_interval_s + engine2.timeout_s) + 6
        assert max(lost_after.values()) < bound_s, lost_after
        print(f"ops lost {sorted(round(v, 1) for v in lost_after.values())} s after the engine froze")
        # the frozen engine's containers are reaped once it answers again
        await assert_exactly_once(url, ids, [docker_client, client2], since, settle_s=40)
    finally:
        if frozen_at:
            os.kill(second_dockerd.process.pid, signal.SIGCONT)
        dispatcher.stop()
        client2.close()


async def test_a_requeued_op_that_fails_admission_ends_failed_with_the_reason(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    data = tmp_state / "data"
    data.mkdir()
    data.chmod(0o755)
    since = time.time()
    first = DispatcherProcess(fault_config(config, "adm-1"), tmp_state, "adm-1").start()
    second = DispatcherProcess(fault_config(config, "adm-2"), tmp_state, "adm-2")
    try:
        (op,) = await publish_jobs(url, [probe("adm", 60, data_dir=str(data))])
        running = (await wait_states(url, [op], {"running"}, 60, why=first.log_tail()))[op]
        first.kill()
        docker_client.api.remove_container(running["container_id"], force=True)  # gone meanwhile
        data.chmod(0o700)  # and its data directory is no longer readable by the runner
        second.start()
        final = (await wait_states(url, [op], TERMINAL_STATES, 60, why=second.log_tail()))[op]
    finally:
        first.kill()
        second.stop()
    assert final["state"] == "failed", final
    assert final["error"]["reason"] == "invalid_job" and final["error"]["field"] == "data_dir", final["error"]
    assert "not readable by the container user" in final["error"]["message"]
    states = statuses(await all_events(url, op))
    assert states[-3:] == ["lost", "queued", "failed"], states  # requeued, then refused
    await assert_exactly_once(url, [op], [docker_client], since)


async def test_a_runner_that_cannot_reach_nats_fails_within_runner_ready_s(
    config: Config, tmp_state: Path, no_leftover_containers: None
) -> None:
    # an operator's own nats-server, listening on 127.0.0.1 only: containers cannot reach it
    server = EmbeddedNats(tmp_state / "nats-local", free_port(), host="127.0.0.1")
    await server.start()
    try:
        cfg = fault_config(
            msgspec.structs.replace(config, nats=msgspec.structs.replace(config.nats, url=server.url)),
            "ready",
        )
        path = write_config(cfg, tmp_state / "ready.toml")
        started = time.monotonic()
        done = await asyncio.to_thread(run_cli, ["submit", "probe", "--json"], path, 120)
        took_s = time.monotonic() - started
    finally:
        await asyncio.to_thread(server.stop)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    record = json.loads(done.stdout)
    assert record["state"] == "failed" and record["error"]["reason"] == "runner_unreachable", record
    message = record["error"]["message"]
    assert f":{server.port}" in message and "nats://" in message, message  # names the URL tried
    assert "127.0.0.1 only" in message, message  # and says what to change
    ended = record["timestamps"]["failed"] - record["timestamps"]["running"]
    assert ended <= cfg.dispatcher.runner_ready_s + 3, ended
    print(f"runner_unreachable {ended:.1f}s after the container started; command took {took_s:.1f}s")


async def test_a_job_that_kills_the_dispatcher_is_dead_lettered_across_restarts(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    cfg = fault_config(config, "poison", poison_after_failures=3)
    since = time.time()
    argv = python_argv("tests.crashing_dispatcher")
    nc = await nats.connect(url)
    dead = await nc.jetstream().subscribe("ktrdr.dead.>", ordered_consumer=True)
    (poison,) = await publish_jobs(url, [{"job_id": new_id("poison"), "kind": "crash_dispatcher"}])
    good = ""
    crashes = 0
    letter: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + 120
        while letter is None:
            assert time.monotonic() < deadline, "no dead letter"
            proc = DispatcherProcess(cfg, tmp_state, f"poison-{crashes}", argv=argv)
            proc.start()
            assert proc.process is not None
            while proc.alive() and letter is None:
                try:
                    letter = json.loads((await dead.next_msg(timeout=0.5)).data)
                except TimeoutError:
                    pass
            if not proc.alive():
                assert proc.process.returncode == -signal.SIGKILL, proc.log_tail()
                crashes += 1
            else:  # dead-lettered: the queue moves on, this dispatcher runs the next job
                (good,) = await publish_jobs(url, [probe("after", 0)])
                final = await wait_states(url, [good, poison], TERMINAL_STATES, 60, why=proc.log_tail())
                proc.stop()
    finally:
        await nc.close()
    assert letter["job_id"] == poison
    assert crashes == cfg.dispatcher.poison_after_failures, crashes
    assert letter["deliveries"] == cfg.dispatcher.poison_after_failures + 1
    assert final[poison]["state"] == "failed" and final[poison]["error"]["reason"] == "dead_letter"
    assert final[good]["state"] == "completed"  # the queue moved on
    await assert_exactly_once(url, [good, poison], [docker_client], since)


async def test_a_one_shot_command_runs_only_its_own_op(
    config: Config, tmp_state: Path, js_handles: JetStreamHandles, no_leftover_containers: None
) -> None:
    path = write_config(fault_config(config, "oneshot"), tmp_state / "oneshot.toml")
    queued = []
    for _ in range(3):
        done = await asyncio.to_thread(
            run_cli, ["submit", "probe", "-p", "hold_s=30", "--detach", "--json"], path
        )
        assert done.returncode == 0, done.stderr
        queued.append(json.loads(done.stdout)["op_id"])
    started = time.monotonic()
    done = await asyncio.to_thread(run_cli, ["submit", "probe", "--json"], path, 120)
    took_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "completed"
    assert took_s < 25, took_s  # its own op, not 30 s of other people's work
    # other people's work is untouched: still in the queue, never admitted, no op record
    assert await records(config.nats.url, queued) == {}
    info = await js_handles.js.stream_info("KTRDR_JOBS")
    assert info.state.messages == 3
    print(f"one-shot submit with 3 x 30 s ops queued took {took_s:.1f}s")


async def test_a_runner_that_goes_silent_is_lost_and_its_op_runs_again(
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    """The runner's network is cut mid-run (its container keeps running, silent): after
    heartbeat_timeout_s the attempt is lost, its container stopped and removed, and the op
    runs again to completion."""
    url = config.nats.url
    cfg = fault_config(config, "silent")
    since = time.time()
    with DispatcherProcess(cfg, tmp_state, "silent") as proc:
        (op,) = await publish_jobs(url, [probe("silent", 6)])
        running = (await wait_states(url, [op], {"running"}, 60, why=proc.log_tail()))[op]
        deadline = time.monotonic() + 30
        while not ((await records(url, [op]))[op].get("progress") or {}).get("step") == "hold":
            assert time.monotonic() < deadline, "the runner never reported progress"
            await asyncio.sleep(0.1)  # until the runner is heard from: then cut it off
        cut_at = time.time()
        docker_client.api.disconnect_container_from_network(
            running["container_id"], RUNNER_NETWORK, force=True
        )
        final = (await wait_states(url, [op], TERMINAL_STATES, 90, why=proc.log_tail()))[op]
    assert final["state"] == "completed" and final["attempts"] == 2, final
    events = await all_events(url, op)
    lost = next(e for e in events if e["event"] == "status" and e["state"] == "lost")
    assert "no heartbeat" in lost["message"], lost
    silent_s = lost["ts"] - cut_at
    assert cfg.dispatcher.heartbeat_timeout_s <= silent_s < cfg.dispatcher.heartbeat_timeout_s + 5, silent_s
    await assert_exactly_once(url, [op], [docker_client], since)
