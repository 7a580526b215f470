"""Issue 14: a deep queue drains with no op lost, and the dispatcher's memory stays flat.

``ktrdr-run dispatcher`` runs as its own process against a real nats-server and the real
Docker engine. bench/queue.py measures the same with 10,000 jobs; these are the checks
that fit a test run.

- A few hundred probe jobs are published straight to NATS before the dispatcher starts,
  with ``max_waiting_jobs`` small, so most of them wait in the stream. Afterwards every
  job has exactly one op record and it is completed, one result event and one terminal
  status event, no error event, no rejection, no dead letter, and the jobs stream and the
  dispatchers' consumer are empty; the dispatcher's RSS did not grow with the ops.
- Finished op records pile up in the bucket for the retention period (14 days by
  default), and the dispatcher's sweep reads every record every ``lease_s / 2``: 10,000
  finished records must not grow its memory. Reading them all into one list did: here
  +25 MiB resident after four sweeps and +65 MiB at the peak; read a batch at a time,
  +3 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import nats.errors
import pytest
from nats.js import api

from dispatcher.config import Config
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats
from dispatcher.jetstream import ensure_jetstream
from dispatcher.kvwatch import current_entries
from runner.protocol import (
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    JOBS_STREAM,
    OPS_BUCKET,
    TERMINAL_STATES,
    Job,
    OpRecord,
    encode,
    job_subject,
)
from tests.faults import DispatcherProcess

MIB = 1024 * 1024
#: Jobs queued: ~60 s of draining at 3-5 probe ops/s on 2 cores (4 probes fit at once).
JOBS = 200
#: Job messages the dispatcher may hold while they wait for capacity: the rest stay queued.
MAX_WAITING = 8
#: The drain, from the dispatcher's start (it checks the image and the engine first): a
#: hang fails here; a loaded machine (1 op/s, measured beside other test runs) still fits.
DRAIN_DEADLINE_S = 300.0
#: How much RSS may grow from the warm mark (the first 10% of ops done: connections and
#: lazily imported code paths in place) to the end. Measured here: +1.4 to +1.6 MiB, the
#: allocator still warming up (bench/queue.py: RSS levels off after ~500 ops, then grows
#: ~1 KiB per op, within noise). A leak of 20 KiB per op (a record, a subscription, a task
#: kept per op) would exceed it.
RSS_GROWTH_LIMIT = 4 * MIB
#: Finished records put in the bucket for the sweep to read.
FINISHED_RECORDS = 10_000
#: Their bound: the peak over the sweeps (VmHWM) against the RSS before the records came.
SWEEP_RSS_LIMIT = 8 * MIB


def rss_bytes(pid: int, name: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {name} for process {pid}")


@pytest.fixture
def processes() -> Iterator[list[DispatcherProcess]]:
    """Dispatcher processes the test starts: killed at teardown if still running (a
    pytest timeout skips the test's own finally)."""
    started: list[DispatcherProcess] = []
    yield started
    for process in started:
        process.kill()


def queue_config(config: Config, suffix: str, **changes: Any) -> Config:
    """The session's test config with a dispatcher id of its own and ``changes``."""
    dispatcher = msgspec.structs.replace(
        config.dispatcher, dispatcher_id=f"{config.dispatcher.dispatcher_id}-{suffix}", **changes
    )
    return msgspec.structs.replace(config, dispatcher=dispatcher)


async def wait_ready(nc: Any, process: DispatcherProcess, deadline: float) -> None:
    """Until the dispatcher answers a ping (a process start has no event to wait for: it
    is asked until it answers, within the deadline)."""
    while True:
        assert process.alive(), f"the dispatcher exited at start:\n{process.log_tail()}"
        assert time.monotonic() < deadline, f"the dispatcher never answered:\n{process.log_tail()}"
        try:
            await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=1.0)
            return
        except nats.errors.TimeoutError:
            continue
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.2)  # the server says at once that nobody listens: pace the asking


class Terminal:
    """Terminal status events of the queued ops, as they come (an ordered consumer on the
    event stream: none is missed), with the dispatcher's RSS at the warm mark."""

    def __init__(self, op_ids: set[str], warm_after: int) -> None:
        self.op_ids = op_ids
        self.states: dict[str, list[str]] = {}
        self.strangers = 0
        self.pid = 0
        self.warm_after = warm_after
        self.warm_rss = 0
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        event = json.loads(msg.data)
        if event.get("state") not in TERMINAL_STATES:
            return
        op_id = event.get("op_id", "")
        if op_id not in self.op_ids:
            self.strangers += 1
            return
        self.states.setdefault(op_id, []).append(event["state"])
        if not self.warm_rss and len(self.states) >= self.warm_after and self.pid:
            self.warm_rss = rss_bytes(self.pid)
        self.changed.set()

    async def wait_all(self, process: DispatcherProcess, deadline: float) -> None:
        while len(self.states) < len(self.op_ids):
            self.changed.clear()
            assert process.alive(), f"the dispatcher died:\n{process.log_tail()}"
            left = deadline - time.monotonic()
            assert left > 0, (
                f"{len(self.states)}/{len(self.op_ids)} ops ended within the deadline:\n{process.log_tail()}"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 5.0))


@pytest.mark.docker
@pytest.mark.nats
@pytest.mark.timeout(DRAIN_DEADLINE_S + 90)
async def test_a_deep_queue_drains_with_no_op_lost_and_flat_memory(
    nats_server: EmbeddedNats,
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
    processes: list[DispatcherProcess],
) -> None:
    cfg = queue_config(config, "drain", max_waiting_jobs=MAX_WAITING)
    nc = await connect(nats_server.url, name="test-queue-drain")
    try:
        await ensure_jetstream(nc, cfg, mode="apply")  # what `ktrdr-run setup` does
        js = nc.jetstream()
        tag = uuid.uuid4().hex[:8]
        op_ids = [f"drain-{tag}-{i:04d}" for i in range(JOBS)]
        # published as any NATS client would, all before a dispatcher runs
        acks = await asyncio.gather(
            *(
                js.publish(
                    job_subject("probe"),
                    encode(Job(job_id=op_id, kind="probe", submitted_by="test-queue")),
                    headers={"Nats-Msg-Id": op_id},
                )
                for op_id in op_ids
            )
        )
        assert not [ack for ack in acks if ack.duplicate]
        assert (await js.stream_info(JOBS_STREAM)).state.messages == JOBS

        terminal = Terminal(set(op_ids), warm_after=JOBS // 10)
        await js.subscribe(
            "ktrdr.ops.*.status",
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
            cb=terminal.on_msg,
        )
        process = DispatcherProcess(cfg, tmp_state, "drain-dispatcher")
        processes.append(process)
        started = time.monotonic()
        deadline = started + DRAIN_DEADLINE_S
        process.start()
        assert process.process is not None
        terminal.pid = process.process.pid
        await wait_ready(nc, process, deadline)
        held = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        assert held.num_ack_pending <= MAX_WAITING, held  # the rest wait in the stream
        await terminal.wait_all(process, deadline)
        drained_s = time.monotonic() - started
        final_rss = rss_bytes(terminal.pid)

        # every job: one record, completed; nothing else in the bucket
        kv = await js.key_value(OPS_BUCKET)
        records = {entry.key: json.loads(entry.value) for entry in await current_entries(kv)}
        assert set(records) == set(op_ids), sorted(set(records) ^ set(op_ids))[:10]
        not_completed = {
            k: (r["state"], r.get("error")) for k, r in records.items() if r["state"] != "completed"
        }
        assert not not_completed, list(not_completed.items())[:10]
        # one terminal status event each, and it said completed
        assert Counter(len(states) for states in terminal.states.values()) == {1: JOBS}
        assert {states[0] for states in terminal.states.values()} == {"completed"}
        assert terminal.strangers == 0
        # one result event each, no error event, no rejection, no dead letter
        results = (await js.stream_info(EVENTS_STREAM, subjects_filter="ktrdr.ops.*.result")).state.subjects
        assert results == {f"ktrdr.ops.{op_id}.result": 1 for op_id in op_ids}
        errors = (await js.stream_info(EVENTS_STREAM, subjects_filter="ktrdr.ops.*.error")).state.subjects
        assert not errors, errors
        rejected = (await js.stream_info(EVENTS_STREAM, subjects_filter="ktrdr.rejected.>")).state.subjects
        assert not rejected, rejected
        assert (await js.stream_info(DEAD_LETTER_STREAM)).state.messages == 0
        # the queue is empty: every job message was acknowledged when its op was claimed
        assert (await js.stream_info(JOBS_STREAM)).state.messages == 0
        consumer = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0), consumer

        growth = final_rss - terminal.warm_rss
        print(
            f"\n{JOBS} queued probe jobs (max_waiting_jobs {MAX_WAITING}) drained in {drained_s:.1f}s "
            f"({JOBS / drained_s:.2f} ops/s from the dispatcher's start); RSS warm (after "
            f"{JOBS // 10} ops) {terminal.warm_rss / MIB:.1f} MiB, drained {final_rss / MIB:.1f} MiB, "
            f"growth {growth / MIB:+.2f} MiB (limit {RSS_GROWTH_LIMIT / MIB:g} MiB)"
        )
        assert terminal.warm_rss and growth < RSS_GROWTH_LIMIT, (terminal.warm_rss, final_rss)
    finally:
        await nc.close()
        code = processes[-1].stop() if processes else 0
    assert code == 0, f"dispatcher exit code {code}:\n{processes[-1].log_tail()}"


def finished_record(op_id: str, dispatcher_id: str) -> bytes:
    """A completed probe op's record, the size of a real one (~1.4 KB)."""
    record = OpRecord(
        op_id=op_id,
        kind="probe",
        state="completed",
        params_digest="0" * 64,
        submitted_by="test-queue",
        host="local",
        container_id="c" * 64,
        image="ktrdr-runner:cpu-000000000000",
        dispatcher=dispatcher_id,
        attempts=1,
        timestamps={s: 1.7e9 for s in ("queued", "placing", "starting", "running", "completed")},
        result={f"field_{i}": "x" * 30 for i in range(20)},
        exit_code=0,
        log_tail=[f"probe: line {i} " + "y" * 40 for i in range(5)],
    )
    return encode(record)


@pytest.mark.docker
@pytest.mark.nats
@pytest.mark.timeout(180)
async def test_finished_records_in_the_bucket_do_not_grow_the_dispatchers_memory(
    nats_server: EmbeddedNats,
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
    processes: list[DispatcherProcess],
) -> None:
    # a sweep every second (lease_s / 2)
    cfg = queue_config(config, "sweep", lease_s=2.0)
    nc = await connect(nats_server.url, name="test-queue-sweep")
    try:
        await ensure_jetstream(nc, cfg, mode="apply")
        js = nc.jetstream()
        kv = await js.key_value(OPS_BUCKET)
        # each sweep reads the bucket through a consumer of its own: the server says so
        sweeps = asyncio.Queue[str]()

        async def on_created(msg: Any) -> None:
            await sweeps.put(msg.subject)

        stream = f"KV_{OPS_BUCKET}"
        await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream}.>", cb=on_created)

        async def next_sweeps(count: int, process: DispatcherProcess) -> None:
            for _ in range(count):
                try:
                    await asyncio.wait_for(sweeps.get(), 30)
                except TimeoutError:
                    raise AssertionError(f"no sweep within 30s:\n{process.log_tail()}") from None

        process = DispatcherProcess(cfg, tmp_state, "sweep-dispatcher")
        processes.append(process)
        process.start()
        assert process.process is not None
        pid = process.process.pid
        await wait_ready(nc, process, time.monotonic() + 120)
        await next_sweeps(3, process)  # warm: its sweeps have run on the empty bucket
        before = rss_bytes(pid)
        me = cfg.dispatcher.dispatcher_id
        for first in range(0, FINISHED_RECORDS, 500):
            await asyncio.gather(
                *(
                    kv.put(f"done-{i:05d}", finished_record(f"done-{i:05d}", me))
                    for i in range(first, min(FINISHED_RECORDS, first + 500))
                )
            )
        while not sweeps.empty():  # sweeps that began before every record was in
            sweeps.get_nowait()
        await next_sweeps(4, process)
        assert process.alive(), process.log_tail()
        after, peak = rss_bytes(pid), rss_bytes(pid, "VmHWM")
        print(
            f"\n{FINISHED_RECORDS} finished records: dispatcher RSS {before / MIB:.1f} MiB before, "
            f"{after / MIB:.1f} MiB after 4 sweeps over them, peak {peak / MIB:.1f} MiB "
            f"(limit +{SWEEP_RSS_LIMIT / MIB:g} MiB)"
        )
        assert peak - before < SWEEP_RSS_LIMIT, (before, after, peak)
    finally:
        await nc.close()
        code = processes[-1].stop() if processes else 0
    assert code == 0, f"dispatcher exit code {code}:\n{processes[-1].log_tail()}"
