"""A 3-node JetStream cluster (issue 14): R3 streams, and losing the meta leader mid-run.

Three real nats-server processes (tests/nats_cluster.py, configurations from the code
behind ``ktrdr-run nats config --cluster``: operator mode, ``sync_interval: always``),
``ktrdr-run dispatcher`` as its own process given the list of the three URLs, the real
Docker engine; runners get the same list (each loopback address swapped for the runners'
network gateway) and move to another node when theirs dies.

- Setup: on a cluster every stream, bucket and the object store is created with 3
  replicas, on one server with 1; "apply" raises R1 to R3 keeping the data, "bind" only
  reports it.
- Fault: with 10 ops running, the JetStream meta leader is SIGKILLed. Jobs submitted
  during the outage are acknowledged and run; every op completes exactly once (one
  container, one result, one status sequence); records and events stay readable through
  the two survivors; the restarted node catches up (its stream states equal the others').
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from dispatcher.authority import Authority
from dispatcher.config import Config, DispatcherConfig, NatsConfig
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.errors import JetStreamSetupError, NatsUnavailable
from dispatcher.jetstream import ensure_jetstream
from runner.protocol import (
    ARTIFACTS_BUCKET,
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    DISPATCHERS_BUCKET,
    EVENTS_STREAM,
    HOSTS_BUCKET,
    JOBS_STREAM,
    OPS_BUCKET,
    RESERVATIONS_BUCKET,
    TERMINAL_STATES,
)
from tests.conftest import KTRDR_RUN, SESSION_TAG, creations, unavailable
from tests.faults import DispatcherProcess
from tests.nats_cluster import NatsCluster, Node, client_names, stream_states

pytestmark = [pytest.mark.nats]

STREAMS = {
    JOBS_STREAM: f"stream {JOBS_STREAM}",
    EVENTS_STREAM: f"stream {EVENTS_STREAM}",
    DEAD_LETTER_STREAM: f"stream {DEAD_LETTER_STREAM}",
    **{
        f"KV_{bucket}": f"KV {bucket}"
        for bucket in (OPS_BUCKET, HOSTS_BUCKET, RESERVATIONS_BUCKET, DISPATCHERS_BUCKET)
    },
    f"OBJ_{ARTIFACTS_BUCKET}": f"object store {ARTIFACTS_BUCKET}",
}
AUTO = "[nats] replicas = 0: 3 on a cluster"


@pytest.fixture
async def cluster(tmp_state: Path) -> AsyncIterator[NatsCluster]:
    """Three nats-server processes in one JetStream cluster, with the trust chain of
    ``tmp_state`` (so a dispatcher with that state directory uses its credentials)."""
    nodes = NatsCluster(Authority.load_or_create(tmp_state), tmp_state / "cluster")
    try:
        await nodes.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start means unavailable
        await asyncio.to_thread(nodes.stop)
        unavailable(f"a 3-node nats-server cluster could not start: {exc}")
    try:
        yield nodes
    finally:
        await asyncio.to_thread(nodes.stop)


async def replicas_of(js: JetStreamContext) -> dict[str, tuple[int, int]]:
    """Each stream's configured replicas, and how many servers hold it (leader + peers)."""
    out = {}
    for name in STREAMS:
        info = await js.stream_info(name)
        peers = len((info.cluster.replicas if info.cluster else None) or [])
        out[name] = (int(info.config.num_replicas or 1), peers + 1)
    return out


async def wait_replicas(js: JetStreamContext, replicas: int, timeout_s: float = 15) -> None:
    """Until every stream has ``replicas`` servers holding it (raising replicas adds the
    new peers in the background), and the dispatchers' consumer too."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await replicas_of(js)
        consumer = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        holders = 1 + len((consumer.cluster.replicas if consumer.cluster else None) or [])
        if found == dict.fromkeys(STREAMS, (replicas, replicas)) and holders == replicas:
            return
        assert time.monotonic() < deadline, (found, f"consumer on {holders}")
        await asyncio.sleep(0.1)


# -- replicas --------------------------------------------------------------------------------


async def test_a_cluster_gets_r3_and_one_server_r1(cluster: NatsCluster, tmp_state: Path) -> None:
    for node in cluster.nodes:  # what `ktrdr-run nats config --cluster` writes, running
        text = node.conf.read_text()
        assert "sync_interval: always" in text and "no_advertise: true" in text, node.name
    config = Config(state_dir=str(tmp_state), nats=NatsConfig(url=cluster.url, embedded=False))
    nc = await connect(cluster.url, name="replicas", credentials=cluster.creds("replicas"))
    try:
        handles = await ensure_jetstream(nc, config, mode="apply")
        assert handles.replicas == 3 and not handles.drift
        await wait_replicas(handles.js, 3)
    finally:
        await nc.close()

    single = EmbeddedNats(tmp_state / "single", free_port())
    try:
        await single.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start means unavailable
        unavailable(f"nats-server could not start: {exc}")
    try:
        one = msgspec.structs.replace(config, nats=NatsConfig(url=single.url, embedded=False))
        nc = await connect(single.url, name="replicas-single")
        try:
            explicit = msgspec.structs.replace(one, nats=msgspec.structs.replace(one.nats, replicas=3))
            with pytest.raises(JetStreamSetupError, match=r"\[nats\] replicas = 3 needs that many"):
                await ensure_jetstream(nc, explicit, mode="apply")
            handles = await ensure_jetstream(nc, one, mode="apply")
            assert handles.replicas == 1 and not handles.drift
            assert await replicas_of(handles.js) == dict.fromkeys(STREAMS, (1, 1))
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(single.stop)


async def test_apply_raises_r1_to_r3_and_bind_only_reports(cluster: NatsCluster, tmp_state: Path) -> None:
    auto = Config(state_dir=str(tmp_state), nats=NatsConfig(url=cluster.url, embedded=False))
    r1 = msgspec.structs.replace(auto, nats=msgspec.structs.replace(auto.nats, replicas=1))
    nc = await connect(cluster.url, name="raise", credentials=cluster.creds("raise"))
    try:
        # as a deployment that began on one server has them
        handles = await ensure_jetstream(nc, r1, mode="apply")
        assert await replicas_of(handles.js) == dict.fromkeys(STREAMS, (1, 1))
        await handles.js.publish("ktrdr.ops.kept-1.log", b'{"kept": true}')
        await handles.ops.put("kept-1", b'{"state": "completed"}')

        expected_drift = sorted(
            f"{label} has 1 replica(s) on the server; this config says 3 ({AUTO})"
            for label in STREAMS.values()
        )
        for mode in ("bind", "create"):
            bound = await ensure_jetstream(nc, auto, mode=mode)
            assert sorted(bound.drift) == expected_drift, (mode, bound.drift)
            assert not bound.updated and not bound.created, mode
        assert await replicas_of(handles.js) == dict.fromkeys(STREAMS, (1, 1))  # nothing changed

        applied = await ensure_jetstream(nc, auto, mode="apply")
        assert sorted(applied.updated) == sorted(
            f"{label} now has 3 replica(s), was 1 ({AUTO})" for label in STREAMS.values()
        )
        assert sorted(applied.drift) == expected_drift  # what it found, before it changed it
        await wait_replicas(handles.js, 3)
        # the data came along
        kept = await handles.js.get_last_msg(EVENTS_STREAM, "ktrdr.ops.kept-1.log")
        assert kept.data == b'{"kept": true}'
        assert (await applied.ops.get("kept-1")).value == b'{"state": "completed"}'

        again = await ensure_jetstream(nc, auto, mode="apply")
        assert not again.updated and not again.drift and not again.created
    finally:
        await nc.close()


# -- the list of URLs ------------------------------------------------------------------------


async def test_a_list_of_urls_connects_while_one_answers(tmp_state: Path) -> None:
    """``[nats] url`` as a list: one node listening is enough (for the quick probe too);
    none listening names them all."""
    server = EmbeddedNats(tmp_state / "one", free_port())
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start means unavailable
        unavailable(f"nats-server could not start: {exc}")
    dead = [f"nats://127.0.0.1:{free_port()}" for _ in range(2)]
    try:
        for retry in (False, True):
            nc = await connect(f"{dead[0]}, {server.url},{dead[1]}", name="list", retry=retry)
            assert nc.connected_url is not None and nc.connected_url.port == server.port
            await nc.close()
        with pytest.raises(NatsUnavailable, match=f"no NATS server answers at {dead[0]},{dead[1]}: "):
            await connect(",".join(dead), name="none", retry=False)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.docker
def test_runners_get_every_url_with_loopback_swapped(docker_client: docker.DockerClient) -> None:
    engine = DockerEngine(connect_docker(), name="local")  # closing it closes its client
    try:
        gateway = engine.ensure_runner_network()
        listed = "nats://127.0.0.1:4001,nats://10.9.8.7:4002,nats://ktrdr:secret@localhost:4003"
        assert engine.runner_nats_url(listed) == (
            f"nats://{gateway}:4001,nats://10.9.8.7:4002,nats://ktrdr:secret@{gateway}:4003"
        )
        assert engine.runner_nats_url("nats://127.0.0.1:4222") == f"nats://{gateway}:4222"  # as before
    finally:
        engine.close()


# -- losing the meta leader with 10 ops running ----------------------------------------------

RUNNING = 10
DURING_OUTAGE = 5
HOLD_S = 15.0


def probe_job(op_id: str, hold_s: float) -> dict[str, Any]:
    return {
        "job_id": op_id,
        "kind": "probe",
        "params": {"hold_s": hold_s, "tick_s": 0.5},
        "resources": {"cpus": 0.1, "memory_gb": 0.125},
        "timeout_s": 300,
        "labels": {"test": "cluster"},
    }


async def submit(js: JetStreamContext, job: dict[str, Any], timeout_s: float) -> float:
    """Publish ``job`` until JetStream acknowledges it (during a failover a publish may
    get no answer; its Nats-Msg-Id makes the retry safe). Returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            ack = await js.publish(
                "ktrdr.jobs.probe",
                json.dumps(job).encode(),
                headers={"Nats-Msg-Id": job["job_id"]},
                timeout=2,
            )
            assert ack.stream == JOBS_STREAM
            return time.monotonic() - started
        except nats.errors.Error as exc:  # no answer, no responders, no stream response
            assert time.monotonic() - started < timeout_s, f"job {job['job_id']} not acknowledged: {exc!r}"


async def states(kv: KeyValue, op_ids: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = dict.fromkeys(op_ids)
    for op_id in op_ids:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            out[op_id] = json.loads((await kv.get(op_id)).value or b"{}")["state"]
    return out


async def wait_states(
    kv: KeyValue,
    op_ids: list[str],
    wanted: set[str] | frozenset[str],
    process: DispatcherProcess,
    timeout_s: float,
) -> None:
    """Until every op's record is in one of ``wanted`` (reads that fail mid-failover retry)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, str | None] = {}
    while True:
        assert process.alive(), f"the dispatcher died:\n{process.log_tail()}"
        with contextlib.suppress(nats.errors.Error):
            seen = await states(kv, op_ids)
            if all(state in wanted for state in seen.values()):
                return
        assert time.monotonic() < deadline, (
            f"not all {sorted(wanted)} in {timeout_s}s: {seen}\n{process.log_tail()}"
        )
        await asyncio.sleep(0.2)


async def op_events(js: JetStreamContext, op_id: str) -> list[dict[str, Any]]:
    """Every event of one op, read back from the event stream."""
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=f"ktrdr.ops.{op_id}.>")
    total = sum((info.state.subjects or {}).values())
    sub = await js.subscribe(f"ktrdr.ops.{op_id}.>", stream=EVENTS_STREAM, ordered_consumer=True)
    out: list[dict[str, Any]] = []
    try:
        while len(out) < total:
            msg = await sub.next_msg(timeout=5)
            out.append({"_subject": msg.subject, **json.loads(msg.data)})
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def read_everything(
    js: JetStreamContext, kv: KeyValue, op_ids: list[str], timeout_s: float
) -> tuple[float, dict[str, list[dict[str, Any]]]]:
    """Every op's record and events, retried until they answer; the seconds it took."""
    started = time.monotonic()
    events: dict[str, list[dict[str, Any]]] = {}
    while True:
        try:
            for op_id in op_ids:
                await kv.get(op_id)
                if op_id not in events:
                    events[op_id] = await op_events(js, op_id)
            return time.monotonic() - started, events
        except nats.errors.Error as exc:  # no answer while a new leader is elected
            assert time.monotonic() - started < timeout_s, (
                f"records/events unreadable for {timeout_s}s: {exc}"
            )
            await asyncio.sleep(0.2)


async def lead_on(nc: NATS, stream: str, node: str, timeout_s: float = 20) -> None:
    """Make ``node`` the leader of ``stream`` (leader stepdowns that prefer it)."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(nats.errors.Error):
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader == node:
                return
            if info.cluster is not None and info.cluster.leader:  # not mid-election
                request = json.dumps({"placement": {"preferred": node}}).encode()
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=2)
        assert time.monotonic() < deadline, f"{node} did not become the leader of {stream}"
        await asyncio.sleep(0.2)


async def wait_runners(cluster: NatsCluster, op_ids: list[str], timeout_s: float) -> None:
    """Until the runner of every op in ``op_ids`` is connected to some node."""
    deadline = time.monotonic() + timeout_s
    wanted = {f"ktrdr-runner-{op_id}" for op_id in op_ids}
    while True:
        connected: set[str] = set()
        for node in cluster.nodes:
            connected.update(await asyncio.to_thread(client_names, node))
        if wanted <= connected:
            return
        assert time.monotonic() < deadline, f"runners not connected: {sorted(wanted - connected)}"
        await asyncio.sleep(0.2)


async def ping(nc: NATS, process: DispatcherProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.alive(), f"dispatcher exited at start:\n{process.log_tail()}"
        try:
            await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=1.0)
            return
        except nats.errors.TimeoutError:
            assert time.monotonic() < deadline, f"dispatcher not ready:\n{process.log_tail()}"
        except nats.errors.NoRespondersError:  # nobody listens yet: said at once, so wait a little
            assert time.monotonic() < deadline, f"dispatcher not ready:\n{process.log_tail()}"
            await asyncio.sleep(0.1)


async def wait_caught_up(
    victim: Node, others: list[Node], streams: list[str], timeout_s: float
) -> dict[str, int]:
    """Until ``victim`` reports, for each of ``streams``, the same last sequence as every
    other node; those sequences."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, dict[str, int]] = {}
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            last = {}
            for node in [victim, *others]:
                found = await asyncio.to_thread(stream_states, node)
                last[node.name] = {name: int(found[name]["last_seq"]) for name in streams}
            views = list(last.values())
            if all(view == views[0] for view in views):
                return views[0]
        assert time.monotonic() < deadline, f"{victim.name} did not catch up in {timeout_s}s: {last}"
        await asyncio.sleep(0.2)


@pytest.mark.docker
async def test_killing_the_meta_leader_loses_no_op(
    cluster: NatsCluster,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
) -> None:
    started = time.monotonic()
    config = Config(
        state_dir=str(tmp_state),  # holds the authority: the dispatcher's own credentials
        nats=NatsConfig(url=cluster.url, embedded=False),
        dispatcher=DispatcherConfig(
            dispatcher_id=f"{SESSION_TAG}-cluster",
            cancel_grace_s=3.0,
            heartbeat_s=1.0,
            progress_record_interval_s=0.5,
            ack_wait_s=10.0,
            data_roots=[str(tmp_state)],
        ),
    )
    created = creations(docker_client)
    process = DispatcherProcess(config, tmp_state, "cluster-dispatcher", argv=[KTRDR_RUN, "-v", "dispatcher"])
    nc: NATS | None = None
    try:
        async with asyncio.timeout(150):
            process.start()
            nc = await connect(cluster.url, name="cluster-check", credentials=cluster.creds("cluster-check"))
            await ping(nc, process, 120)
            js = nc.jetstream(timeout=2)  # a read with no answer is retried sooner
            kv = await js.key_value(OPS_BUCKET)
            await wait_replicas(js, 3)  # the dispatcher made them R3

            running = [f"cl-run-{i:02d}" for i in range(RUNNING)]
            since = time.time()
            for op_id in running:
                await submit(js, probe_job(op_id, HOLD_S), 10)
            await wait_states(kv, running, {"running"}, process, 60)

            leader = await cluster.meta_leader()
            victim = cluster.node(leader)
            others = [node for node in cluster.nodes if node is not victim]
            # the worst case: the killed node also leads the streams every op writes to
            led = [JOBS_STREAM, EVENTS_STREAM, f"KV_{OPS_BUCKET}"]
            for stream in led:
                await lead_on(nc, stream, leader)
            await wait_runners(cluster, running, 30)
            on_victim = await asyncio.to_thread(client_names, victim)
            runners_on_victim = sum(name.startswith("ktrdr-runner-") for name in on_victim)
            dispatcher_on_victim = "ktrdr-run-cli" in on_victim
            events_before = (await asyncio.to_thread(stream_states, victim))[EVENTS_STREAM]["last_seq"]
            killed_at = time.monotonic()
            victim.kill()

            # the survivors answer for every record and event while the killed node is down
            await read_everything(js, kv, running, 30)
            readable_s = time.monotonic() - killed_at
            # jobs submitted during the outage are acknowledged, recorded, and then they run
            late = [f"cl-late-{i:02d}" for i in range(DURING_OUTAGE)]
            ack_s = [await submit(js, probe_job(op_id, 1.0), 30) for op_id in late]
            everyone = running + late
            await read_everything(js, kv, everyone, 30)
            new_leader = await cluster.meta_leader()
            while new_leader in ("", leader):  # the survivors' view, once they have elected
                assert time.monotonic() - killed_at < 30, f"no new meta leader: {new_leader!r}"
                await asyncio.sleep(0.1)
                new_leader = await cluster.meta_leader()
            await wait_states(kv, everyone, TERMINAL_STATES, process, 90)
            done_s = time.monotonic() - killed_at
            assert not victim.alive()  # all of it happened without the killed node

            _, events = await read_everything(js, kv, everyone, 10)
            for op_id in everyone:
                record = json.loads((await kv.get(op_id)).value or b"{}")
                assert record["state"] == "completed", (op_id, record["state"], record.get("error"))
                assert record["attempts"] == 1 and record["error"] is None, (op_id, record)
                statuses = [e["state"] for e in events[op_id] if e.get("event") == "status"]
                assert statuses == ["queued", "placing", "starting", "running", "completed"], (
                    op_id,
                    statuses,
                )
                results = [e for e in events[op_id] if e["_subject"].endswith(".result")]
                assert len(results) == 1, (op_id, len(results))
                assert created.by_attempt(op_id, since) == {"1": 1}, op_id

            # the killed node comes back with its store, and catches up
            victim.start()
            await cluster.wait_healthy([victim], 30)
            caught_up = await wait_caught_up(
                victim, others, [EVENTS_STREAM, f"KV_{OPS_BUCKET}", JOBS_STREAM], 30
            )
            assert caught_up[EVENTS_STREAM] > events_before, (caught_up, events_before)
            print(
                f"\ncluster: killed meta leader {leader} (leading {', '.join(led)}; the dispatcher "
                f"{'was' if dispatcher_on_victim else 'was not'} connected to it, and {runners_on_victim} "
                f"of the runners) with {RUNNING} ops running; new leader "
                f"{new_leader}; {DURING_OUTAGE} jobs acknowledged during the outage (slowest ack "
                f"{max(ack_s):.2f}s); every record and event readable {readable_s:.2f}s after the kill; "
                f"all {len(everyone)} ops completed exactly once {done_s:.1f}s after it; {leader} "
                f"restarted and caught up (events seq {events_before} -> {caught_up[EVENTS_STREAM]}); "
                f"{time.monotonic() - started:.1f}s in all"
            )
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        code = await asyncio.to_thread(process.stop, 60)
    assert code == 0 and not process.alive(), f"dispatcher exit code {code}:\n{process.log_tail()}"
