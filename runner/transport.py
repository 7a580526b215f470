"""Runs one op inside the container and reports it over JetStream.

The op runs on a compute thread. Progress reaches the event loop through a thread-safe
latest-value slot and is published at most every ``progress_interval_s`` (a plain NATS
publish: the event stream captures it; progress may be thinned, never flood). Logs go
to the container's output, which the dispatcher streams as log events. The
outcome (result, error, cancel_ack) is published with a JetStream acknowledgement and
retried until ``result_deadline_s``, so a NATS outage does not lose it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from runner import registry
from runner.errors import Cancelled, InvalidParams, KtrdrRunnerError, UnknownKind
from runner.isolation import Checks, Violations, check_isolation
from runner.natscreds import CredsError, parse_creds
from runner.protocol import (
    ARTIFACTS_BUCKET,
    EVENTS_STREAM,
    EXIT_RUNNER_UNREACHABLE,
    CancelAckEvent,
    CancelRequest,
    ErrorEvent,
    HeartbeatEvent,
    ProgressEvent,
    ProgressSnapshot,
    ResultEvent,
    RunnerSpec,
    encode,
    event_decoder,
    now,
    op_subject,
    runner_inbox,
)
from runner.sdk import CancelToken, OpContext
from runner.upload import upload_artifact

log = logging.getLogger("ktrdr.runner")

EXIT_OK = 0
EXIT_OP_ERROR = 1
EXIT_BAD_SPEC = 2
EXIT_CANCELLED = 130
TRACEBACK_TAIL_CHARS = 4000
DATA_DIR = Path("/data")  # where the dispatcher mounts the data directory, read-only


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of them) with any password replaced by ``***``:
    what logs and messages may show of a connection URL."""

    def one(part: str) -> str:
        scheme, sep, rest = part.partition("://")
        if not sep or "@" not in rest.split("/", 1)[0]:
            return part
        userinfo, _, host = rest.partition("@")
        user, colon, _password = userinfo.partition(":")
        return f"{scheme}://{user}{':***' if colon else ''}@{host}" if colon else f"{scheme}://***@{host}"

    return ",".join(one(part) for part in url.split(","))


class NatsSink:
    """The SDK sink inside a container: non-blocking slots drained by an asyncio task."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        nc: NATS,
        js: JetStreamContext,
        spec: RunnerSpec,
        violations: Violations | None = None,
    ):
        self._loop = loop
        self._nc = nc
        self._js = js
        self._spec = spec
        self._violations = violations  # what the connection's error callback records
        self._lock = threading.Lock()
        self._latest: ProgressSnapshot | None = None
        self._milestones: list[ProgressSnapshot] = []
        self._wake = asyncio.Event()
        self._store: Any = None

    # -- called from the compute thread --------------------------------------------------

    def progress(self, snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        with self._lock:
            if milestone:
                self._milestones.append(snapshot)
                self._latest = None  # the milestone is newer
            else:
                self._latest = snapshot
        self._loop.call_soon_threadsafe(self._wake.set)

    def log(self, level: str, message: str) -> None:
        # The container's output is the one log path: the dispatcher streams it as log
        # events, so a line printed by the op and one logged through the SDK look alike.
        print(f"[{level}] {message}", file=sys.stderr, flush=True)

    def fetch(self, object_name: str) -> bytes:
        future = asyncio.run_coroutine_threadsafe(self._get(object_name), self._loop)
        return future.result(timeout=self._spec.result_deadline_s)

    def check_isolation(self) -> Checks:
        future = asyncio.run_coroutine_threadsafe(
            check_isolation(self._nc, self._violations, self._spec.nats_url), self._loop
        )
        return future.result(timeout=60)  # check_isolation keeps its own, shorter, deadline

    def artifact(self, name: str, object_name: str, data: bytes, content_type: str) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self._put(object_name, data, name, content_type), self._loop
        )
        future.result(timeout=self._spec.result_deadline_s)

    # -- event loop side -----------------------------------------------------------------

    async def _get(self, object_name: str) -> bytes:
        if self._store is None:
            self._store = await self._js.object_store(ARTIFACTS_BUCKET)
        try:
            result = await self._store.get(object_name)
        except NotFoundError:
            raise KtrdrRunnerError(f"no artifact {object_name!r} in the artifact store") from None
        return bytes(result.data or b"")

    async def _put(self, object_name: str, data: bytes, name: str, content_type: str) -> None:
        # through the dispatchers' upload service: a runner has no object-store write
        await upload_artifact(
            self._nc,
            self._spec.op_id,
            object_name,
            data,
            content_type,
            name=name,
            timeout_s=self._spec.result_deadline_s * 0.9,  # inside the caller's own wait
        )
        log.info("stored artifact %s as %s (%d bytes)", name, object_name, len(data))

    async def pump(self) -> None:
        """Publish progress until cancelled; at most once per progress_interval_s."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await asyncio.sleep(self._spec.progress_interval_s)

    async def flush(self) -> None:
        """Publish the pending progress, now."""
        with self._lock:
            latest, self._latest = self._latest, None
            milestones, self._milestones = self._milestones, []
        op_id = self._spec.op_id
        pending = [*milestones, *([latest] if latest is not None else [])]
        for sent, snapshot in enumerate(pending):
            progress = ProgressEvent(
                op_id=op_id,
                attempt=self._spec.attempt,
                ts=snapshot.ts,
                percent=snapshot.percent,
                step=snapshot.step,
                message=snapshot.message,
                metrics=snapshot.metrics,
            )
            try:
                await self._nc.publish(op_subject(op_id, "progress"), encode(progress))
            except Exception as exc:  # noqa: BLE001 - progress is best effort during an outage
                log.warning("progress publish failed (%s); will retry with newer progress", exc)
                with self._lock:  # milestones are kept for the next flush
                    self._milestones[:0] = [m for m in milestones[sent:]]
                return


async def publish_acked(js: JetStreamContext, subject: str, payload: bytes, deadline: float) -> bool:
    """Publish with a JetStream ack, retrying through outages until ``deadline``."""
    delay_s = 0.2
    while True:
        try:
            await js.publish(subject, payload, timeout=2.0)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure is retried until the deadline
            if time.monotonic() >= deadline:
                log.error("could not publish %s before the deadline: %s", subject, exc)
                return False
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)


class NatsUnreachable(Exception):
    """The runner could not reach NATS within its ready deadline."""


def read_secret(fd: int, *, timeout_s: float, max_bytes: int = 64 * 1024) -> str:
    """Everything written to ``fd`` until its end, within ``timeout_s`` (TimeoutError
    otherwise): how the op's credentials arrive, through a pipe rather than the
    environment."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size = 0
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError(f"nothing complete arrived within {timeout_s:g}s")
        readable, _, _ = select.select([fd], [], [], left_s)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode()
        size += len(chunk)
        if size > max_bytes:
            raise OSError(f"more than {max_bytes} bytes")
        chunks.append(chunk)


def warm_up(kinds: list[str]) -> None:
    """Import what ops need before one arrives (a warm pool container's head start):
    every registered op's module, and what the ops of ``kinds`` declare they import
    (their ``preload``; every kind's when ``kinds`` is empty)."""
    for kind in kinds or registry.kinds():
        for module in registry.get(kind).preload:
            importlib.import_module(module)


def _auth_options(creds: str) -> dict[str, Any]:
    """nats-py options that present ``creds`` (a ``.creds`` text); none without."""
    if not creds:
        return {}
    try:
        user = parse_creds(creds)
    except CredsError as exc:
        raise NatsUnreachable(f"the credentials on standard input are unusable: {exc}") from None
    return {"user_jwt_cb": user.jwt_cb(), "signature_cb": user.signature_cb()}


async def connect(spec: RunnerSpec, creds: str = "", violations: Violations | None = None) -> NATS:
    """Connect to the dispatcher's NATS within ``spec.ready_s``; afterwards reconnect by
    itself for as long as the op lives. :class:`NatsUnreachable` names the URL and the
    last error when the deadline passes (the dispatcher fails the op with that reason).
    ``violations`` records the server's permissions violations (probe's isolation check)."""
    last_error: list[str] = []

    async def on_error(exc: Exception) -> None:
        if violations is not None and violations.record(exc):
            return  # provoked on purpose by an isolation check, which reports it
        said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if said not in last_error:  # each distinct problem once: retries do not flood the log
            log.warning("nats: %s", exc)
        last_error.append(said)

    # one server, or a cluster's nodes (comma-separated): any of them will do, and the
    # client moves to another when its node is lost
    servers = [url.strip() for url in spec.nats_url.split(",") if url.strip()]
    try:
        # reconnect forever once connected (outages are ridden out), but the first
        # connection has a deadline: a runner that never reaches NATS must say so and exit
        return await asyncio.wait_for(
            nats.connect(
                spec.nats_url if len(servers) <= 1 else servers,
                name=f"ktrdr-runner-{spec.op_id}",
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=on_error,
                # replies (JetStream acks, gets) come under an inbox only this op may hear
                inbox_prefix=runner_inbox(spec.op_id),
                **_auth_options(creds),
            ),
            timeout=spec.ready_s,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        why = last_error[-1] if last_error else (str(exc) or type(exc).__name__)
        raise NatsUnreachable(
            f"cannot reach NATS at {redact_url(spec.nats_url)} within {spec.ready_s:g}s ({why})"
        ) from None


async def run_op(spec: RunnerSpec, *, creds: str = "") -> int:
    """Run the op described by ``spec`` (connecting with ``creds``, a ``.creds`` text,
    when given); returns the process exit code."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    token = CancelToken()
    violations = Violations()
    try:
        nc = await connect(spec, creds, violations)
    except NatsUnreachable as exc:
        print(f"runner: {exc}", file=sys.stderr, flush=True)
        return EXIT_RUNNER_UNREACHABLE
    js = nc.jetstream()
    sink = NatsSink(loop, nc, js, spec, violations)
    op_id = spec.op_id

    async def on_cancel(msg: Any) -> None:
        try:
            request = event_decoder.decode(msg.data)
            reason = request.reason if isinstance(request, CancelRequest) else ""
        except Exception:  # noqa: BLE001 - a malformed request still means cancel
            reason = ""
        token.cancel(reason or "cancel requested")

    await nc.subscribe(op_subject(op_id, "cancel"), cb=on_cancel)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, token.cancel, f"signal {signal.Signals(signum).name}")
    try:  # a cancel requested before we subscribed is still in the event stream
        # a direct get by subject: the one read of the stream a runner's credentials allow
        earlier = await js.get_last_msg(EVENTS_STREAM, op_subject(op_id, "cancel"), direct=True)
        if (earlier.seq or 0) > spec.cancel_after_seq:  # not one meant for an earlier op
            token.cancel("cancel requested before start")
    except Exception:  # noqa: BLE001 - no earlier cancel request
        pass

    async def heartbeat() -> None:
        # the first beat at once: it tells the dispatcher the runner reached NATS
        while True:
            event = HeartbeatEvent(
                op_id=op_id, ts=now(), attempt=spec.attempt, uptime_s=time.monotonic() - started
            )
            try:
                await nc.publish(op_subject(op_id, "heartbeat"), encode(event))
            except Exception:  # noqa: BLE001 - heartbeats are best effort
                pass
            await asyncio.sleep(spec.heartbeat_s)

    pump = asyncio.create_task(sink.pump())
    beat = asyncio.create_task(heartbeat())
    ctx = OpContext(
        op_id=op_id,
        kind=spec.kind,
        sink=sink,
        attempt=spec.attempt,
        cancel_token=token,
        data_dir=DATA_DIR if DATA_DIR.is_dir() else None,
    )
    outcome: tuple[str, bytes]
    code = EXIT_OK
    try:
        op = registry.get(spec.kind)
        params = op.parse_params(spec.params)
        result = await asyncio.to_thread(op.fn, ctx, params)
        if not isinstance(result, dict):
            raise KtrdrRunnerError(f"operation {spec.kind!r} returned {type(result).__name__}, not a dict")
        event: Any = ResultEvent(
            op_id=op_id, ts=now(), attempt=spec.attempt, result=result, artifacts=ctx.artifacts
        )
        outcome = (op_subject(op_id, "result"), encode(event))
    except Cancelled as exc:
        code = EXIT_CANCELLED
        event = CancelAckEvent(
            op_id=op_id,
            ts=now(),
            attempt=spec.attempt,
            partial_saved=ctx.partial_saved,
            message=str(exc),
            artifacts=ctx.artifacts,
        )
        outcome = (op_subject(op_id, "cancel_ack"), encode(event))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_OP_ERROR
        event = ErrorEvent(
            op_id=op_id,
            attempt=spec.attempt,
            ts=now(),
            reason="exit_nonzero",
            message=f"operation exited with code {code}",
        )
        outcome = (op_subject(op_id, "error"), encode(event))
    except BaseException as exc:  # noqa: BLE001 - every op failure becomes an error event
        code = EXIT_OP_ERROR
        event = ErrorEvent(
            op_id=op_id,
            attempt=spec.attempt,
            ts=now(),
            reason="invalid_job" if isinstance(exc, InvalidParams | UnknownKind) else "op_error",
            message=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            field=getattr(exc, "field", "") or "",
            traceback="".join(traceback.format_exception(exc))[-TRACEBACK_TAIL_CHARS:],
        )
        outcome = (op_subject(op_id, "error"), encode(event))
        print(event.traceback, file=sys.stderr, flush=True)
    pump.cancel()
    beat.cancel()
    await sink.flush()
    deadline = time.monotonic() + spec.result_deadline_s
    if not await publish_acked(js, outcome[0], outcome[1], deadline):
        code = code or EXIT_OP_ERROR
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except Exception:  # noqa: BLE001 - the outcome is already acknowledged
        await nc.close()
    return code
