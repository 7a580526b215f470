"""10,000 queued jobs: the dispatcher's memory while it drains the queue, and the drain check.

A nats-server of the bench's own (random port, own store) gets N ``probe`` job messages
(default 10,000) published straight to ``ktrdr.jobs.probe`` before any dispatcher runs
there, so every one of them is queued. Then ``ktrdr-run dispatcher`` starts as a process
of its own (the service's defaults, the local Docker engine) and drains the queue, one
fresh container per op, holding at most ``max_waiting_jobs`` job messages at a time.

Its resident memory (VmRSS of /proc/<pid>/status) is read every second, and at the
moment the 10%, 50%, 90% and 100% mark of ops reach a terminal state (the bench follows
their status events). The reference, measured in the same run: the same dispatcher
started on an empty queue (a second, empty nats-server), read the same ``--warmup-s``
after it first answered a ping; the N-queued run is read at that same point too. Growth
is reported per 1,000 ops between the 10% mark (the allocator warm) and the end.

The drain check, from JetStream itself afterwards: every job has exactly one op record
and it is ``completed`` (no other record exists), exactly one ``result`` event per op
and no ``error`` event, exactly one terminal status event per op, no rejection, no dead
letter, nothing left in the jobs stream nor pending or unacknowledged on the
dispatchers' consumer, and no container of the dispatcher left once it stopped.

Everything the bench started (servers, dispatchers, containers, its temp directory) is
stopped and removed at the end, also after a failure, Ctrl-C or SIGTERM.

    python bench/queue.py [--jobs 10000] [--max-waiting 64] [--warmup-s 5] [--cpus 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
from nats.js import api

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service_process import DispatcherProcess, rss_bytes, wait_ready

from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.kvwatch import current_entries
from runner.protocol import (
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    EVENTS_STREAM,
    JOBS_STREAM,
    LABEL_DISPATCHER,
    OPS_BUCKET,
    TERMINAL_STATES,
    Job,
    Resources,
    encode,
    job_subject,
)

if TYPE_CHECKING:
    import docker

    from dispatcher.config import Config

# A bench script's folder leads sys.path, so `import queue` (urllib3 does it, under
# docker) finds this file, whichever script runs. Imported under that name, it hands the
# standard library's queue over in its place. Hence too: nothing above imports docker
# (the import that is under way then); what needs it is imported where it is used.
if __name__ == "queue":
    _spec = importlib.util.spec_from_file_location(__name__, Path(sysconfig.get_path("stdlib")) / "queue.py")
    assert _spec is not None and _spec.loader is not None
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])

MIB = 1024 * 1024
MARKS = (0.1, 0.5, 0.9, 1.0)
#: No op reaching a terminal state for this long: the drain is stuck.
STALL_S = 300.0
PUBLISH_BATCH = 500


def bench_config(state: Path, url: str, dispatcher_id: str, max_waiting: int) -> Config:
    """The service's defaults, but for the server, the id and ``max_waiting_jobs``."""
    from dispatcher.config import Config, DispatcherConfig, NatsConfig

    return Config(
        state_dir=str(state),
        nats=NatsConfig(url=url, embedded=False),
        dispatcher=DispatcherConfig(dispatcher_id=dispatcher_id, max_waiting_jobs=max_waiting),
    )


async def subject_counts(nc: Any, stream: str, subjects: str) -> dict[str, int]:
    """Messages per subject matching ``subjects`` in ``stream``, every page of them."""
    counts: dict[str, int] = {}
    while True:
        request = json.dumps({"subjects_filter": subjects, "offset": len(counts)}).encode()
        reply = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", request, timeout=30)).data)
        if "error" in reply:
            raise RuntimeError(f"stream info {stream}: {reply['error']}")
        page = reply.get("state", {}).get("subjects") or {}
        counts.update(page)
        if not page or len(counts) >= int(reply.get("total") or 0):
            return counts


@dataclass
class Drain:
    """Terminal status events of the queued ops as they come, with the dispatcher's RSS
    read at each mark and every second."""

    op_ids: set[str]
    terminal: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    foreign: int = 0
    marks: dict[float, tuple[float, int, int]] = field(default_factory=dict)  # (t, done, rss)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    pid: int = 0
    started: float = 0.0
    last_change: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_status(self, data: bytes) -> None:
        event = json.loads(data)
        state, op_id = event.get("state"), event.get("op_id", "")
        if state not in TERMINAL_STATES:
            return
        if op_id not in self.op_ids:
            self.foreign += 1
            return
        if op_id in self.terminal:
            self.duplicates += 1
            return
        self.terminal[op_id] = state
        self.last_change = time.monotonic()
        done = len(self.terminal)
        for mark in MARKS:
            if mark not in self.marks and done >= math.ceil(mark * len(self.op_ids)) and self.pid:
                self.marks[mark] = (time.monotonic() - self.started, done, rss_bytes(self.pid))
        self.changed.set()

    async def on_msg(self, msg: Any) -> None:
        self.on_status(msg.data)

    async def sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append(
                    (time.monotonic() - self.started, len(self.terminal), rss_bytes(self.pid))
                )
            await asyncio.sleep(1.0)


async def publish_jobs(js: Any, job_ids: list[str], cpus: float | None) -> float:
    """Publish one probe job per id (``Nats-Msg-Id`` = job id, as every client does),
    asking ``cpus`` (None: the kind's default), ``PUBLISH_BATCH`` acks awaited at a time;
    returns seconds taken."""
    resources = Resources(cpus=cpus)
    started = time.monotonic()
    for first in range(0, len(job_ids), PUBLISH_BATCH):
        batch = job_ids[first : first + PUBLISH_BATCH]
        await asyncio.gather(
            *(
                js.publish(
                    job_subject("probe"),
                    encode(Job(job_id=op_id, kind="probe", submitted_by="bench-queue", resources=resources)),
                    headers={"Nats-Msg-Id": op_id},
                    timeout=30,
                )
                for op_id in batch
            )
        )
    return time.monotonic() - started


async def reference_rss(state: Path, max_waiting: int, warmup_s: float, stack: Stack) -> int:
    """RSS of the dispatcher on an empty queue (its own empty server), ``warmup_s`` after
    it first answered."""
    server = EmbeddedNats(state / "nats-ref", free_port(), host="0.0.0.0")
    stack.servers.append(server)
    await server.start()
    config = bench_config(state / "ref", server.url, f"bench-queue-ref-{uuid.uuid4().hex[:6]}", max_waiting)
    (state / "ref").mkdir()
    process = DispatcherProcess(config, state, "dispatcher-ref")
    stack.dispatchers.append(process)
    nc = await nats.connect(server.url, name="bench-queue-ref")
    try:
        process.start()
        await wait_ready(nc, process)
        await asyncio.sleep(warmup_s)
        return rss_bytes(process.pid)
    finally:
        await nc.close()
        process.stop()
        server.stop()


@dataclass
class Stack:
    """What the bench started, for the cleanup."""

    dispatchers: list[DispatcherProcess] = field(default_factory=list)
    servers: list[EmbeddedNats] = field(default_factory=list)

    def close(self, client: docker.DockerClient | None) -> None:
        import docker

        for process in self.dispatchers:
            with contextlib.suppress(Exception):
                process.stop()
        if client is not None:
            for process in self.dispatchers:
                mine = {"label": f"{LABEL_DISPATCHER}={process.dispatcher_id}"}
                with contextlib.suppress(Exception):
                    for container in client.api.containers(all=True, quiet=True, filters=mine):
                        with contextlib.suppress(docker.errors.NotFound):
                            client.api.remove_container(container["Id"], force=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()


@dataclass
class Check:
    """The drain check's findings: (what, expected, found) rows; OK when all agree."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, expected: object, found: object) -> None:
        self.rows.append((what, str(expected), str(found)))

    @property
    def ok(self) -> bool:
        return all(expected == found for _what, expected, found in self.rows)


async def drain_check(nc: Any, js: Any, drain: Drain, n: int) -> Check:
    """What JetStream holds once the queue drained (see the module's docstring)."""
    check = Check()
    kv = await js.key_value(OPS_BUCKET)
    records = {entry.key: json.loads(entry.value) for entry in await current_entries(kv)}
    states: dict[str, int] = {}
    for record in records.values():
        states[record["state"]] = states.get(record["state"], 0) + 1
    check.add("op records, all ours", n, sum(1 for key in records if key in drain.op_ids))
    check.add("op records not ours", 0, sum(1 for key in records if key not in drain.op_ids))
    check.add("op records completed", n, states.get("completed", 0))
    retried = sum(1 for record in records.values() if record.get("attempts", 0) != 1)
    results = await subject_counts(nc, EVENTS_STREAM, "ktrdr.ops.*.result")
    result_ops = {subject.split(".")[2] for subject in results}
    check.add("ops with a result event", n, len(result_ops & drain.op_ids))
    check.add("ops with >1 result event", 0, sum(1 for count in results.values() if count != 1))
    check.add("error events", 0, sum((await subject_counts(nc, EVENTS_STREAM, "ktrdr.ops.*.error")).values()))
    check.add(
        "rejection events", 0, sum((await subject_counts(nc, EVENTS_STREAM, "ktrdr.rejected.>")).values())
    )
    check.add("terminal status events", n, len(drain.terminal))
    check.add("  of them completed", n, sum(1 for state in drain.terminal.values() if state == "completed"))
    check.add("  second terminal events", 0, drain.duplicates)
    check.add("dead letters", 0, (await js.stream_info(DEAD_LETTER_STREAM)).state.messages)
    check.add("jobs stream messages", 0, (await js.stream_info(JOBS_STREAM)).state.messages)
    consumer = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
    check.add("consumer pending", 0, consumer.num_pending)
    check.add("consumer unacknowledged", 0, consumer.num_ack_pending)
    check.add("ops with more than one attempt (info)", retried, retried)
    check.add("job redeliveries (info)", consumer.num_redelivered, consumer.num_redelivered)
    return check


async def wait_drained(drain: Drain, process: DispatcherProcess, n: int) -> None:
    """Until every queued op reached a terminal state; stops on a dead dispatcher or a
    stall of ``STALL_S``. Prints progress every 10%."""
    next_report = 0.1
    while len(drain.terminal) < n:
        drain.changed.clear()
        if not process.alive():
            raise SystemExit(f"the dispatcher died at {len(drain.terminal)}/{n}:\n{process.log_tail()}")
        if time.monotonic() - drain.last_change > STALL_S:
            raise SystemExit(
                f"stuck at {len(drain.terminal)}/{n}: nothing finished in {STALL_S:g}s\n{process.log_tail()}"
            )
        done = len(drain.terminal)
        if done >= next_report * n:
            elapsed = time.monotonic() - drain.started
            rss = rss_bytes(process.pid) / MIB
            print(f"  {done:>6}/{n} terminal after {elapsed:7.1f}s   RSS {rss:6.1f} MiB", file=sys.stderr)
            next_report = math.floor(done / n * 10 + 1) / 10
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain.changed.wait(), 5.0)


async def wait_consumer_idle(js: Any, timeout_s: float = 60.0) -> None:
    """Until the dispatchers' consumer has nothing pending or unacknowledged (the last
    job message is acknowledged when its op is claimed, well before it ends)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.5)


def table(
    n: int,
    reference: int,
    startup: tuple[float, int, int],
    drain: Drain,
    after: tuple[float, int, int],
    peak: int,
) -> str:
    """The memory and rate figures, side by side."""
    lines = [f"{'':34}{'RSS MiB':>9}{'ops done':>10}{'t s':>9}"]

    def row(label: str, rss: int, done: object = "", t: object = "") -> None:
        t_text = f"{t:.1f}" if isinstance(t, float) else str(t)
        lines.append(f"{label:34}{rss / MIB:9.1f}{done!s:>10}{t_text:>9}")

    row("reference: empty queue, warm", reference, 0)
    row(f"start-up: {n:,} queued, warm", startup[2], startup[1], startup[0])
    for mark in MARKS:
        t, done, rss = drain.marks[mark]
        row(f"{mark:.0%} drained", rss, done, t)
    row("drained + 10 s idle", after[2], after[1], after[0])
    row("peak (VmHWM, whole life)", peak)
    row("peak of the 1 s samples", max(s[2] for s in drain.samples))
    t10, done10, rss10 = drain.marks[0.1]
    t100, done100, rss100 = drain.marks[1.0]
    ops = max(1, done100 - done10)
    _t50, done50, rss50 = drain.marks[0.5]
    half = max(1, done100 - done50)
    lines += [
        "",
        f"start-up, {n:,} queued vs empty queue   {(startup[2] - reference) / MIB:+.1f} MiB "
        f"(ratio {startup[2] / reference:.2f})",
        f"drained + 10 s vs empty queue        {(after[2] - reference) / MIB:+.1f} MiB "
        f"(ratio {after[2] / reference:.2f}); peak {(peak - reference) / MIB:+.1f} MiB",
        f"growth 10% -> 100% drained           {(rss100 - rss10) / MIB:+.2f} MiB over {ops:,} ops = "
        f"{(rss100 - rss10) / ops * 1000 / MIB:+.2f} MiB per 1,000 ops ({(rss100 - rss10) / ops / 1024:+.2f} "
        "KiB per op)",
        f"growth 50% -> 100% drained           {(rss100 - rss50) / half * 1000 / MIB:+.2f} MiB per 1,000 ops "
        "(the second half: past the allocator's warm-up)",
        f"growth 10% -> drained + 10 s         {(after[2] - rss10) / ops * 1000 / MIB:+.2f} MiB "
        "per 1,000 ops",
        f"drain rate                           {done100 / t100:.2f} ops/s overall "
        f"(first answer to last op), {ops / max(1e-9, t100 - t10):.2f} ops/s from 10% to 100%",
    ]
    return "\n".join(lines)


async def main(n: int, max_waiting: int, warmup_s: float, cpus: float | None) -> None:
    from dispatcher.engine import connect_docker
    from dispatcher.images import ensure_runner_image
    from dispatcher.jetstream import ensure_jetstream

    state = Path(tempfile.mkdtemp(prefix="ktrdr-bench-queue-"))
    stack = Stack()
    client: docker.DockerClient | None = None
    nc: Any = None
    background: list[asyncio.Task[Any]] = []
    try:
        client = connect_docker()
        image = ensure_runner_image(client, progress=lambda line: print(line, file=sys.stderr))
        print(f"reference: dispatcher on an empty queue, {warmup_s:g}s after it answers ...", file=sys.stderr)
        reference = await reference_rss(state, max_waiting, warmup_s, stack)

        server = EmbeddedNats(state / "nats", free_port(), host="0.0.0.0")
        stack.servers.append(server)
        await server.start()
        dispatcher_id = f"bench-queue-{uuid.uuid4().hex[:6]}"
        config = bench_config(state / "main", server.url, dispatcher_id, max_waiting)
        (state / "main").mkdir()
        nc = await nats.connect(server.url, name="bench-queue", pending_size=64 * MIB)
        # what `ktrdr-run setup` does: the streams and the consumer, before any dispatcher
        await ensure_jetstream(nc, config, mode="apply")
        js = nc.jetstream()
        tag = uuid.uuid4().hex[:8]
        job_ids = [f"q{tag}-{i:06d}" for i in range(n)]
        publish_s = await publish_jobs(js, job_ids, cpus)
        queued = (await js.stream_info(JOBS_STREAM)).state.messages
        if queued != n:
            raise SystemExit(f"{queued} job messages in the stream after publishing {n}")
        print(f"published {n:,} probe jobs in {publish_s:.1f}s; starting the dispatcher ...", file=sys.stderr)

        drain = Drain(set(job_ids))
        await js.subscribe(
            "ktrdr.ops.*.status",
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
            cb=drain.on_msg,
        )
        process = DispatcherProcess(config, state, "dispatcher")
        stack.dispatchers.append(process)
        process.start()
        drain.pid = process.pid
        await wait_ready(nc, process)
        drain.started = time.monotonic()
        drain.last_change = drain.started
        background.append(asyncio.create_task(drain.sample()))
        await asyncio.sleep(warmup_s)
        startup = (time.monotonic() - drain.started, len(drain.terminal), rss_bytes(process.pid))
        await wait_drained(drain, process, n)
        await wait_consumer_idle(js)
        await asyncio.sleep(10.0)  # idle: the periodic work (sweep, health checks) runs meanwhile
        after = (time.monotonic() - drain.started, len(drain.terminal), rss_bytes(process.pid))
        peak = rss_bytes(process.pid, "VmHWM")
        check = await drain_check(nc, js, drain, n)
        code = process.stop()
        left = client.api.containers(
            all=True, quiet=True, filters={"label": f"{LABEL_DISPATCHER}={dispatcher_id}"}
        )
        check.add("dispatcher exit code", 0, code)
        check.add("containers left", 0, len(left))

        print(f"image                               {image}")
        print(
            f"jobs                                {n:,} probe jobs queued before the dispatcher started "
            f"(published in {publish_s:.1f}s); max_waiting_jobs {max_waiting}; local engine"
        )
        print(f"warm = {warmup_s:g}s after the dispatcher first answered a ping")
        print()
        print(table(n, reference, startup, drain, after, peak))
        print()
        print(f"drain check: {'OK' if check.ok else 'FAILED'}")
        for what, expected, found in check.rows:
            mark = "  " if expected == found else "!!"
            print(f"  {mark} {what:40} expected {expected:>8}   found {found:>8}")
        if not check.ok:
            print(process.log_tail(), file=sys.stderr)
            raise SystemExit(1)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        stack.close(client)
        if client is not None:
            client.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="probe jobs to queue (default 10,000)")
    parser.add_argument(
        "--max-waiting", type=int, default=64, help="[dispatcher] max_waiting_jobs (default 64)"
    )
    parser.add_argument("--warmup-s", type=float, default=5.0, help="when start-up RSS is read (default 5 s)")
    parser.add_argument(
        "--cpus", type=float, default=None, help="CPUs each probe asks (default: the kind's, 0.5)"
    )
    args = parser.parse_args()
    if args.cpus is not None and args.cpus <= 0:
        parser.error("--cpus must be above 0")
    if args.jobs < 10:
        parser.error("--jobs must be at least 10 (the 10% mark must be an op)")
    from harness import run

    run(main(args.jobs, args.max_waiting, args.warmup_s, args.cpus))
