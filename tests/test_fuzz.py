"""Fuzz (issue 12): malformed traffic never breaks the dispatcher or touches another op.

The secure default, for real: a nats-server in operator mode (the deployment's own trust
chain in the state directory), ``ktrdr-run dispatcher`` as its own process with the
deployment's credentials, a submitter credential (``fuzzer``) and per-op runner
credentials, the real Docker engine.

From one seeded RNG (``KTRDR_FUZZ_SEED``), 10,000 malformed job messages (random bytes,
broken JSON, wrong types, huge values, bad ids, path-like data directories, symbols and
strategies, unknown fields, deep nesting, unplaceable resources, other messages reusing
the valid jobs' ids) and 1,000 malformed runner events (garbage, wrong types, events
naming another op, forged outcomes, huge fields, and publishes outside the runner's own
subjects) are interleaved with 50 valid probe jobs. Afterwards: the dispatcher is alive
and answers a ping; the 50 ops completed, each exactly as submitted; every other record
is a rejection; every malformed job got exactly one rejection event; nothing was
dead-lettered; no container ran for anything but the 50; the dispatcher's memory did
not grow with the messages (only, boundedly, with the op records rejections leave).

tests/test_malformed_messages.py pins what the fuzz found, each in isolation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import nats
import nats.js.errors
import pytest
from nats.aio.client import RawCredentials

from dispatcher.authority import Authority
from dispatcher.config import Config, DispatcherConfig, NatsConfig
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.kvwatch import current_entries, watch_entries
from runner.protocol import (
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    JOBS_STREAM,
    LABEL_DISPATCHER,
    LABEL_OP_ID,
    OPS_BUCKET,
    TERMINAL_STATES,
    runner_inbox,
)
from tests.conftest import KTRDR_RUN, SESSION_TAG, unavailable
from tests.faults import DispatcherProcess
from tests.fuzz_plan import (
    FUZZ_DEADLINE_S,
    RSS_PER_RECORD,
    RSS_SLACK,
    SEED,
    SUBMITTER,
    VALID_JOBS,
    VALID_PREFIX,
    Message,
    Plan,
)

# -- the server, connections, the dispatcher process -------------------------------------


@dataclass
class SecureNats:
    server: EmbeddedNats
    authority: Authority

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
async def secure_nats(tmp_state: Path) -> AsyncIterator[SecureNats]:
    """nats-server in operator mode with the trust chain of ``tmp_state``, on 0.0.0.0 so
    containers reach it at the runners' network gateway."""
    authority = Authority.load_or_create(tmp_state)
    server = EmbeddedNats(tmp_state / "nats", free_port(), host="0.0.0.0", trust=authority.trust_block())
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start means unavailable
        unavailable(f"nats-server could not start: {exc}")
    try:
        yield SecureNats(server, authority)
    finally:
        await asyncio.to_thread(server.stop)


class Conn:
    """One credential's connection and the errors the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    @classmethod
    async def open(cls, url: str, creds: str, name: str, inbox_prefix: str = "_INBOX") -> Conn:
        conn = cls()
        conn.nc = await nats.connect(
            url,
            name=name,
            user_credentials=RawCredentials(creds),
            inbox_prefix=inbox_prefix.encode(),
            error_cb=conn._on_error,
            connect_timeout=5,
            max_reconnect_attempts=3,
            pending_size=64 * 1024 * 1024,
        )
        return conn

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]


class ContainerCreates:
    """Every op container one dispatcher creates on the engine from now on, live (other
    test sessions may share the engine)."""

    def __init__(self, client: docker.DockerClient, dispatcher_id: str) -> None:
        self.op_ids: Counter[str] = Counter()
        labels = [LABEL_OP_ID, f"{LABEL_DISPATCHER}={dispatcher_id}"]
        self._stream = client.api.events(
            filters={"type": "container", "event": "create", "label": labels}, decode=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True, name="fuzz-creates")
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                self.op_ids[attrs.get(LABEL_OP_ID, "")] += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def ping(nc: Any, timeout_s: float = 2.0) -> dict[str, Any]:
    reply = await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=timeout_s)
    return dict(json.loads(reply.data))


async def wait_ready(nc: Any, process: DispatcherProcess, timeout_s: float = 120) -> dict[str, Any]:
    """Until the dispatcher answers a ping (each try waits for an answer, not a clock)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.alive(), f"dispatcher exited at start:\n{process.log_tail()}"
        try:
            return await ping(nc, 1.0)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            assert time.monotonic() < deadline, f"dispatcher not ready:\n{process.log_tail()}"


async def stream_count(js: Any, stream: str, subjects: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subjects)
    return sum((info.state.subjects or {}).values())


async def op_events(js: Any, op_id: str) -> list[dict[str, Any]]:
    """Every event of one op in the event stream, as JSON where it is JSON."""
    total = await stream_count(js, EVENTS_STREAM, f"ktrdr.ops.{op_id}.>")
    sub = await js.subscribe(f"ktrdr.ops.{op_id}.>", ordered_consumer=True)
    out: list[dict[str, Any]] = []
    try:
        while len(out) < total:
            msg = await sub.next_msg(timeout=10)
            try:
                out.append({"_subject": msg.subject, **json.loads(msg.data)})
            except (ValueError, TypeError, RecursionError):
                out.append({"_subject": msg.subject, "_raw": True})
    finally:
        await sub.unsubscribe()
    return out


@dataclass
class Sampler:
    """The dispatcher's RSS with how many job messages it has finished, over time."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, taken seq, rss)

    async def run(self, js: Any) -> None:
        start = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
                taken = int(info.delivered.stream_seq or 0)
                self.samples.append((time.monotonic() - start, taken, rss_bytes(self.pid)))
            await asyncio.sleep(0.25)

    def warm(self, after: int) -> tuple[float, int, int]:
        """The first sample once ``after`` job messages were taken (else the last)."""
        return next((s for s in self.samples if s[1] >= after), self.samples[-1])


# -- the fuzz run --------------------------------------------------------------------------


@pytest.fixture
def afterwards(secure_nats: SecureNats) -> Iterator[list[Callable[[], object]]]:
    """Stops what the test started (the dispatcher process, the engine's event reader),
    last first, even when the test is cut short (a timeout skips the test's own finally);
    before the server stops."""
    undo: list[Callable[[], object]] = []
    yield undo
    for fn in reversed(undo):
        with contextlib.suppress(Exception):
            fn()


@dataclass
class Sent:
    """What the publishers sent, and what JetStream kept."""

    by_category: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    #: Malformed job messages the jobs stream kept (not dropped as duplicates).
    stored_jobs: int = 0
    seconds: float = 0.0

    @property
    def malformed_jobs(self) -> int:
        return sum(
            n
            for c, n in self.by_category.items()
            if c not in ("valid", "cancel") and not c.startswith("runner")
        )

    @property
    def runner_events(self) -> int:
        return sum(n for c, n in self.by_category.items() if c.startswith("runner"))


class Publisher:
    """Sends the plan in order, 100 at a time (each batch's JetStream acks awaited), except
    messages that reuse a valid op's id: those wait until that op's record exists."""

    def __init__(self, submitter: Conn, runners: dict[str, Conn], kv: Any) -> None:
        self.submitter = submitter
        self.runners = runners
        self.kv = kv
        self.sent = Sent()
        self.recorded: set[str] = set()
        self._recorded_changed = asyncio.Event()
        self._batch: list[Message] = []

    async def watch_records(self) -> None:
        async for entries in watch_entries(self.kv):
            for entry in entries:
                if entry.key.startswith(VALID_PREFIX):
                    self.recorded.add(entry.key)
                    self._recorded_changed.set()

    async def _send(self, message: Message) -> None:
        self.sent.by_category[message.category] += 1
        conn = self.submitter if message.who == "submitter" else self.runners[message.who]
        if not message.allowed or message.category == "cancel":  # no stream ack to wait for
            await conn.nc.publish(message.subject, message.data)
            return
        headers = {"Nats-Msg-Id": message.msg_id} if message.msg_id else None
        ack = await conn.nc.jetstream().publish(message.subject, message.data, headers=headers, timeout=30)
        if ack.duplicate:
            self.sent.duplicates[message.category] += 1
        elif message.who == "submitter" and message.category != "valid":
            self.sent.stored_jobs += 1

    async def _flush(self) -> None:
        await asyncio.gather(*(self._send(m) for m in self._batch))
        self._batch.clear()
        for conn in (self.submitter, *self.runners.values()):
            await conn.nc.flush(timeout=30)

    async def run(self, messages: list[Message]) -> Sent:
        started = time.monotonic()
        deferred: list[Message] = []
        for message in messages:
            if message.target and message.target not in self.recorded:
                deferred.append(message)
                continue
            self._batch.append(message)
            if len(self._batch) >= 100:
                await self._flush()
                self._batch.extend(m for m in deferred if m.target in self.recorded)
                deferred = [m for m in deferred if m.target not in self.recorded]
        await self._flush()
        while deferred:  # reuses of the last valid ops: once those are recorded
            self._recorded_changed.clear()
            self._batch.extend(m for m in deferred if m.target in self.recorded)
            deferred = [m for m in deferred if m.target not in self.recorded]
            await self._flush()
            if deferred:
                await asyncio.wait_for(self._recorded_changed.wait(), 60)
        self.sent.seconds = time.monotonic() - started
        return self.sent


async def wait_all_answered(
    js: Any, kv: Any, plan: Plan, process: DispatcherProcess, timeout_s: float
) -> None:
    """Until the jobs queue is empty and every valid op is terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.alive(), f"the dispatcher died:\n{process.log_tail()}"
        info = await js.consumer_info(JOBS_STREAM, DISPATCHER_CONSUMER)
        stream = await js.stream_info(JOBS_STREAM)
        states: dict[str, str | None] = dict.fromkeys(plan.valid_ids)
        for op in plan.valid_ids:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                states[op] = json.loads((await kv.get(op)).value)["state"]
        idle = info.num_pending == 0 and info.num_ack_pending == 0 and stream.state.messages == 0
        if idle and all(state in TERMINAL_STATES for state in states.values()):
            return
        assert time.monotonic() < deadline, (
            f"not done in {timeout_s}s: {info.num_pending} job messages pending, {info.num_ack_pending} "
            f"held; valid ops {Counter(states.values())}\n{process.log_tail()}"
        )
        await asyncio.sleep(0.5)


async def check_valid_ops(js: Any, kv: Any, plan: Plan, creates: ContainerCreates) -> None:
    """Each valid op completed once, exactly as submitted, whatever else named it."""
    for job in plan.valid:
        op_id = job["job_id"]
        record = json.loads((await kv.get(op_id)).value)
        assert record["state"] == "completed", (op_id, record["state"], record.get("error"))
        assert record["submitted_by"] == SUBMITTER, record  # the subject's name, not the message's
        assert record["params"] == job["params"] and record["labels"] == job["labels"], record
        assert record["attempts"] == 1 and record["error"] is None and record["cancel"] is None, record
        assert "forged" not in json.dumps(record["result"]), record
        events = await op_events(js, op_id)
        statuses = [e["state"] for e in events if e.get("event") == "status"]
        assert statuses == ["queued", "placing", "starting", "running", "completed"], (op_id, statuses)
        assert not [e for e in events if e["_subject"].endswith(".error")], (op_id, events)
        assert creates.op_ids[op_id] == 1, (op_id, creates.op_ids[op_id])


async def check_other_records(kv: Any, plan: Plan, creates: ContainerCreates) -> dict[str, Any]:
    """Every record but the valid ops' is a rejection; no container ran for one."""
    valid = set(plan.valid_ids)
    others = {e.key: json.loads(e.value) for e in await current_entries(kv) if e.key not in valid}
    not_rejections = {
        key: (r["state"], (r.get("error") or {}).get("reason"), r["attempts"])
        for key, r in others.items()
        if r["state"] != "failed" or (r.get("error") or {}).get("reason") != "invalid_job" or r["attempts"]
    }
    assert not not_rejections, list(not_rejections.items())[:20]
    assert not [ghost for ghost in plan.ghosts if ghost in others]
    strays = {op: n for op, n in creates.op_ids.items() if op not in valid}
    assert not strays, strays
    return others


@pytest.mark.docker
@pytest.mark.nats
async def test_fuzz_malformed_jobs_and_events_never_touch_valid_ops(
    secure_nats: SecureNats,
    afterwards: list[Callable[[], object]],
    tmp_state: Path,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
) -> None:
    started = time.monotonic()
    authority = secure_nats.authority
    root = tmp_state / "data"
    root.mkdir()
    root.chmod(0o755)
    (root / "escape").symlink_to("/etc")
    (root / "loop").symlink_to(root / "loop")
    (root / "private").mkdir(mode=0o700)
    (root / "file.csv").write_text("timestamp,open\n")
    config = Config(
        state_dir=str(tmp_state),  # holds the authority: the dispatcher's own credentials
        nats=NatsConfig(url=secure_nats.url, embedded=False),
        dispatcher=DispatcherConfig(
            dispatcher_id=f"{SESSION_TAG}-fuzz",
            cancel_grace_s=3.0,
            heartbeat_s=1.0,
            progress_record_interval_s=0.2,
            ack_wait_s=10.0,
            retry_backoff_s=0.5,
            data_roots=[str(root)],
        ),
    )
    plan = Plan(SEED, root)
    creates = ContainerCreates(docker_client, config.dispatcher.dispatcher_id)
    afterwards.append(creates.close)
    process = DispatcherProcess(config, tmp_state, "fuzz-dispatcher", argv=[KTRDR_RUN, "-v", "dispatcher"])
    afterwards.append(process.kill)
    conns: list[Conn] = []
    background: list[asyncio.Task[Any]] = []
    try:
        # a hang fails here, where it is, and the finally below still cleans up
        async with asyncio.timeout(FUZZ_DEADLINE_S):
            process.start()
            checker = await Conn.open(
                secure_nats.url, authority.mint("dispatcher", "fuzz-check"), "fuzz-check"
            )
            conns.append(checker)
            await wait_ready(checker.nc, process)
            assert process.process is not None
            js = checker.nc.jetstream()
            kv = await js.key_value(OPS_BUCKET)
            sampler = Sampler(process.process.pid)
            background.append(asyncio.create_task(sampler.run(js)))

            submitter = await Conn.open(secure_nats.url, authority.mint("submitter", SUBMITTER), SUBMITTER)
            conns.append(submitter)
            runners: dict[str, Conn] = {}
            for op in [*plan.ghosts, *plan.own_runners]:
                runners[op] = await Conn.open(
                    secure_nats.url,
                    authority.mint_runner(op, 600),
                    f"runner-{op}",
                    inbox_prefix=runner_inbox(op),
                )
                conns.append(runners[op])
            publisher = Publisher(submitter, runners, kv)
            background.append(asyncio.create_task(publisher.watch_records()))
            sent = await publisher.run(plan.messages)
            await wait_all_answered(js, kv, plan, process, timeout_s=120)
            answered_s = time.monotonic() - started

            # the dispatcher survived, answers, and its memory is flat
            assert (await ping(checker.nc))["dispatcher_id"] == config.dispatcher.dispatcher_id
            final_rss = rss_bytes(process.process.pid)
            warm_t, warm_taken, warm_rss = sampler.warm(1_000)
            growth = final_rss - warm_rss

            await check_valid_ops(js, kv, plan, creates)
            others = await check_other_records(kv, plan, creates)
            rss_limit = RSS_SLACK + RSS_PER_RECORD * (len(others) + VALID_JOBS)

            # every malformed job was answered once, by a rejection; nothing dead-lettered
            rejected = await stream_count(js, EVENTS_STREAM, "ktrdr.rejected.>")
            dead = (await js.stream_info(DEAD_LETTER_STREAM)).state.messages
            assert dead == 0, f"{dead} job messages dead-lettered:\n{process.log_tail()}"
            assert rejected == sent.stored_jobs, (rejected, sent.stored_jobs)
            # the runners' publishes outside their own op were the server's to refuse
            forbidden = sent.by_category["runner_forbidden"]
            refused = sum(len(conn.violations()) for conn in runners.values())
            assert forbidden and refused == forbidden, (forbidden, refused)
            assert not submitter.violations(), submitter.violations()[:5]

            trajectory = ", ".join(
                f"{sampler.warm(n)[2] / 2**20:.1f} MiB after {n}" for n in (1_000, 2_500, 5_000, 7_500)
            )
            print(
                f"\nfuzz seed {SEED}: {sum(sent.by_category.values())} messages in {sent.seconds:.1f}s: "
                f"{sent.malformed_jobs} malformed jobs, {sent.by_category['cancel']} garbage cancels, "
                f"{sent.runner_events} runner events ({forbidden} outside their op, {refused} refused), "
                f"{sent.by_category['valid']} valid jobs; JetStream dropped {sum(sent.duplicates.values())} "
                f"as duplicates {dict(sent.duplicates)}; {rejected} rejection events, {len(others)} "
                f"rejected-op records, {dead} dead letters; all answered {answered_s:.1f}s after start\n"
                f"categories: {dict(sorted(sent.by_category.items()))}\n"
                f"dispatcher RSS: warm {warm_rss / 2**20:.1f} MiB (after {warm_taken} job messages, "
                f"t={warm_t:.1f}s); {trajectory}; end {final_rss / 2**20:.1f} MiB; growth "
                f"{growth / 2**20:+.1f} MiB (limit {rss_limit / 2**20:.1f} MiB: 16 MiB + 3 KiB x "
                f"{len(others) + VALID_JOBS} records)"
            )
            assert growth < rss_limit, (warm_rss, final_rss, rss_limit, sampler.samples[-5:])
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.nc.close()
        code = process.stop(timeout_s=60)
    assert code == 0 and not process.alive(), f"dispatcher exit code {code}:\n{process.log_tail()}"
