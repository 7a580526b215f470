"""The dispatcher: pull jobs, validate, claim, place, run one fresh container per op.

Flow of one job message::

    fetch ─▶ decode + validate (bad → error event, ack; never a container)
          ─▶ claim the op in KV (kv.create; an existing op id is a duplicate → ack)
          ─▶ reserve capacity (no room → nak with delay: the job waits in JetStream)
          ─▶ placing → starting (create hardened container) → running (start)
          ─▶ fold the op's events into its record while keeping the message's lease
          ─▶ container exits (or times out / is cancelled) → inspect, log tail, remove
          ─▶ exactly one terminal state (KV compare-and-set) → ack the job message

Nothing of an op runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from discovery.base import Host
from dispatcher.config import Config
from dispatcher.engine import RUNNER_USER, ContainerExit, DockerEngine, hardened_host_config
from dispatcher.errors import InfrastructureError, KtrdrError
from dispatcher.jetstream import JetStreamHandles, dispatcher_consumer_config
from dispatcher.opstore import OpStore
from dispatcher.placement import Ledger, Reservation
from runner import registry
from runner.errors import DataError, InvalidParams, UnknownKind, describe_validation_error
from runner.protocol import (
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    JOBS_STREAM,
    JOBS_SUBJECT_ROOT,
    OPS_SUBJECT_ROOT,
    CancelAckEvent,
    CancelIntent,
    CancelRequest,
    DispatcherInfo,
    ErrorEvent,
    ErrorInfo,
    Job,
    OpRecord,
    ProgressEvent,
    ProgressSnapshot,
    Resources,
    ResultEvent,
    RunnerSpec,
    encode,
    event_decoder,
    is_valid_id,
    job_decoder,
    now,
    op_events_filter,
    op_subject,
    params_digest,
    rejected_subject,
)

log = logging.getLogger("ktrdr.dispatcher")

ImageProvider = Callable[[], str]
NAK_DELAY_S = 1.0


@dataclass
class OpRun:
    """What the dispatcher tracks about one op it is running."""

    op_id: str
    job: Job
    msg: Msg
    reservation: Reservation
    container_id: str = ""
    started_ts: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    progress: ProgressSnapshot | None = None
    progress_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    result: ResultEvent | None = None
    error: ErrorEvent | None = None
    cancel_ack: CancelAckEvent | None = None
    cancel_requested: CancelRequest | None = None
    forced: bool = False
    timed_out: bool = False
    removed: bool = False


class Rejected(Exception):
    """A job message that can never run."""

    def __init__(self, message: str, *, field: str = "", error_type: str = "InvalidJob") -> None:
        super().__init__(message)
        self.field = field
        self.error_type = error_type


def _resolve_resources(job: Job, op: registry.Operation) -> Resources:
    """The job's resources, with the kind's defaults for what it left out."""
    return job.resources.resolved(
        msgspec.structs.replace(op.default_resources, gpu=op.default_resources.gpu or op.gpu)
    )


class Dispatcher:
    """Consumes the job queue and runs each op in a fresh container on ``engine``."""

    def __init__(
        self,
        config: Config,
        nc: NATS,
        handles: JetStreamHandles,
        engine: DockerEngine,
        host: Host,
        image: ImageProvider,
    ) -> None:
        self.config = config
        self.nc = nc
        self.js: JetStreamContext = handles.js
        self.store = OpStore(handles.ops, handles.js)
        self.engine = engine
        self.ledger = Ledger([host])
        self.dispatcher_id = config.dispatcher.dispatcher_id or f"{socket.gethostname()}-{os.getpid()}"
        self._image_provider = image
        self._image: str | None = None
        self._image_lock = asyncio.Lock()
        self._runs: dict[str, OpRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner_nats_url = ""
        self._started_at = now()
        limit = config.dispatcher.max_concurrent_ops
        self.max_concurrent = limit or max(4, int(host.cpus * 8))

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, burst: bool = False, idle_s: float = 1.0) -> None:
        """Consume jobs until :meth:`stop`; with ``burst`` return once the queue is empty
        and every op this dispatcher started has finished (deterministic tests)."""
        await self.js.add_consumer(JOBS_STREAM, dispatcher_consumer_config(self.config))
        psub = await self.js.pull_subscribe_bind(durable=DISPATCHER_CONSUMER, stream=JOBS_STREAM)
        subs = [
            await self.nc.subscribe(DISPATCHER_PING_SUBJECT, cb=self._on_ping),
            await self.nc.subscribe(f"{OPS_SUBJECT_ROOT}.*.cancel", cb=self._on_cancel),
        ]
        connected = self.nc.connected_url.geturl() if self.nc.connected_url else self.config.nats.url
        self._runner_nats_url = self.config.nats.runner_url or await asyncio.to_thread(
            self.engine.runner_nats_url, connected
        )
        log.info(
            "dispatcher %s ready on %s (max %d ops)",
            self.dispatcher_id,
            self.engine.name,
            self.max_concurrent,
        )
        try:
            while not self._stopping.is_set():
                if len(self._runs) >= self.max_concurrent:
                    await self._wait_for_slot(idle_s)
                    continue
                try:
                    msgs = await psub.fetch(1, timeout=idle_s)
                except TimeoutError:
                    if burst and not self._runs and not self._tasks:
                        break
                    continue
                for msg in msgs:
                    if not await self._accept(msg):
                        await self._wait_for_slot(NAK_DELAY_S)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            if self._tasks:
                log.info("dispatcher %s waiting for %d running ops", self.dispatcher_id, len(self._runs))
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stop(self) -> None:
        """Stop taking jobs; :meth:`run` returns once running ops have finished."""
        self._stopping.set()

    async def _wait_for_slot(self, timeout_s: float) -> None:
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), timeout_s)

    async def _on_ping(self, msg: Msg) -> None:
        info = DispatcherInfo(
            dispatcher_id=self.dispatcher_id,
            host=self.engine.name,
            running_ops=len(self._runs),
            started_at=self._started_at,
        )
        await msg.respond(encode(info))

    # -- accepting a job ---------------------------------------------------------------

    async def _accept(self, msg: Msg) -> bool:
        """Handle one job message; False when it was put back for lack of capacity."""
        try:
            job, op = self._validate(msg)
        except Rejected as exc:
            await self._reject(msg, exc)
            return True
        resources = _resolve_resources(job, op)
        if not self.ledger.can_ever_fit(resources):
            await self._reject(
                msg,
                Rejected(
                    f"no host can fit cpus={resources.cpus:g} memory_gb={resources.memory_gb:g} "
                    f"(largest: {self.ledger.largest_host()})",
                    field="resources",
                    error_type="Unplaceable",
                ),
                job=job,
            )
            return True
        record = OpRecord(
            op_id=job.job_id,
            kind=job.kind,
            params=job.params,
            params_digest=params_digest(job.params),
            resources=resources,
            timeout_s=job.timeout_s,
            labels=job.labels,
            submitted_by=job.submitted_by,
            data_dir=self._data_dir(job),
            timestamps={"queued": now()},
        )
        if not await self.store.create(record):
            existing = await self.store.find(job.job_id)
            if existing is None or existing.state != "queued":
                log.info(
                    "op %s: duplicate job message (op is %s); not started again",
                    job.job_id,
                    existing.state if existing else "gone",
                )
                await msg.ack()
                return True
            record = existing
        if await self._cancel_requested_before_start(record):
            await msg.ack()
            return True
        reservation = self.ledger.reserve(job.job_id, resources)
        if reservation is None:
            await msg.nak(delay=NAK_DELAY_S)
            return False
        claimed = await self.store.transition(
            job.job_id,
            "placing",
            allowed_from={"queued"},
            dispatcher=self.dispatcher_id,
            host=reservation.host.name,
            attempts=record.attempts + 1,
        )
        if claimed is None:  # another dispatcher moved it first
            self.ledger.release(job.job_id)
            await msg.ack()
            return True
        run = OpRun(op_id=job.job_id, job=job, msg=msg, reservation=reservation)
        self._runs[run.op_id] = run
        task = asyncio.create_task(self._run_op(run, claimed, op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _validate(self, msg: Msg) -> tuple[Job, registry.Operation]:
        subject_kind = msg.subject[len(JOBS_SUBJECT_ROOT) + 1 :]
        try:
            job = job_decoder.decode(msg.data)
        except msgspec.ValidationError as exc:
            where, problem = describe_validation_error(exc)
            raise Rejected(f"invalid job: {where or 'message'}: {problem}", field=where) from None
        except msgspec.DecodeError as exc:
            raise Rejected(f"job message is not valid JSON: {exc}", error_type="NotJSON") from None
        if job.kind != subject_kind:
            raise Rejected(f"kind {job.kind!r} does not match the subject {msg.subject!r}", field="kind")
        try:
            op = registry.get(job.kind)
            params = op.parse_params(job.params)
        except UnknownKind as exc:
            raise Rejected(str(exc), field="kind", error_type="UnknownKind") from None
        except InvalidParams as exc:
            where = f"params.{exc.field}" if exc.field else "params"
            raise Rejected(str(exc), field=where, error_type="InvalidParams") from None
        data_dir = self._data_dir(job)
        if op.preflight is not None:
            try:
                op.preflight(params, Path(data_dir) if data_dir else None)
            except DataError as exc:
                raise Rejected(str(exc), field="data", error_type="DataError") from None
            except InvalidParams as exc:
                where = f"params.{exc.field}" if exc.field else "params"
                raise Rejected(str(exc), field=where, error_type="InvalidParams") from None
        return job, op

    def _data_dir(self, job: Job) -> str:
        """The host directory to mount read-only at /data for this job ("" = none)."""
        raw = job.data_dir or self.config.dispatcher.data_dir
        if not raw:
            return ""
        path = Path(raw).expanduser()
        if not path.is_absolute():
            raise Rejected(
                f"data_dir {raw!r} must be an absolute path on the dispatcher's host", field="data_dir"
            )
        path = path.resolve()
        if not path.is_dir():
            raise Rejected(f"data_dir {raw!r} is not a directory on the dispatcher's host", field="data_dir")
        if path.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            raise Rejected(
                f"data_dir {raw!r} is not readable by the container user {RUNNER_USER} "
                f"(mode {stat.filemode(path.stat().st_mode)}); run: chmod o+rx {path}",
                field="data_dir",
            )
        roots = [Path(r).expanduser().resolve() for r in self.config.dispatcher.data_roots]
        if roots and not any(path == root or root in path.parents for root in roots):
            raise Rejected(
                f"data_dir {raw!r} is outside the allowed data roots ({', '.join(map(str, roots))})",
                field="data_dir",
            )
        return str(path)

    async def _reject(self, msg: Msg, exc: Rejected, job: Job | None = None) -> None:
        job_id, kind = (job.job_id, job.kind) if job else _peek_ids(msg)
        event = ErrorEvent(
            op_id=job_id or "",
            ts=now(),
            reason="invalid_job",
            message=str(exc),
            error_type=exc.error_type,
            field=exc.field,
        )
        log.warning("rejected job %s on %s: %s", job_id or "(no usable job_id)", msg.subject, exc)
        await self.js.publish(rejected_subject(kind or "unknown"), encode(event))
        if job_id and await self.store.find(job_id) is None:
            await self.js.publish(op_subject(job_id, "error"), encode(event))
            await self.store.create(
                OpRecord(
                    op_id=job_id,
                    kind=kind or "",
                    state="failed",
                    timestamps={"failed": now()},
                    error=ErrorInfo(
                        reason="invalid_job", message=str(exc), error_type=exc.error_type, field=exc.field
                    ),
                )
            )
        await msg.ack()

    async def _cancel_requested_before_start(self, record: OpRecord) -> bool:
        """A cancel published before the dispatcher saw the job: never start a container."""
        if record.cancel is None:
            try:
                raw = await self.js.get_last_msg(EVENTS_STREAM, op_subject(record.op_id, "cancel"))
            except Exception:
                return False
            request = event_decoder.decode(raw.data or b"{}")
            reason = request.reason if isinstance(request, CancelRequest) else ""
        else:
            reason = record.cancel.reason
        done = await self.store.transition(
            record.op_id,
            "cancelled",
            allowed_from={"queued"},
            cancel=CancelIntent(requested_at=now(), reason=reason, acked=False),
            message="cancelled before start; no container was created",
        )
        return done is not None

    # -- running an op -----------------------------------------------------------------

    async def _image_tag(self) -> str:
        async with self._image_lock:
            if self._image is None:
                self._image = await asyncio.to_thread(self._image_provider)
            return self._image

    async def _run_op(self, run: OpRun, record: OpRecord, op: registry.Operation) -> None:
        cfg = self.config.dispatcher
        keepalive = asyncio.create_task(self._keep_lease(run.msg))
        progress_writer = asyncio.create_task(self._write_progress(run))
        sub = None
        try:
            sub = await self.nc.subscribe(
                op_events_filter(run.op_id), cb=functools.partial(self._on_event, run)
            )
            image = await self._image_tag()
            if run.cancel_requested is not None:
                await self.store.transition(
                    run.op_id,
                    "cancelled",
                    allowed_from={"placing"},
                    cancel=CancelIntent(
                        requested_at=run.cancel_requested.ts, reason=run.cancel_requested.reason
                    ),
                    message="cancelled before start; no container was created",
                )
                return
            spec = RunnerSpec(
                op_id=run.op_id,
                kind=run.job.kind,
                params=run.job.params,
                nats_url=self._runner_nats_url,
                attempt=record.attempts,
                heartbeat_s=cfg.heartbeat_s,
                result_deadline_s=cfg.result_deadline_s,
                host=run.reservation.host.name,
            )
            host_config = hardened_host_config(
                self.engine.api,
                record.resources,
                pids_limit=cfg.pids_limit,
                scratch_mb=cfg.scratch_mb,
                data_dir=record.data_dir,
            )
            run.container_id = await self.engine.create(
                image=image,
                name=f"ktrdr-{run.op_id}-a{record.attempts}",
                op_id=run.op_id,
                kind=run.job.kind,
                dispatcher_id=self.dispatcher_id,
                spec_json=encode(spec).decode(),
                host_config=host_config,
            )
            await self.store.transition(
                run.op_id, "starting", allowed_from={"placing"}, image=image, container_id=run.container_id
            )
            run.started_ts = now()
            await self.engine.start(run.container_id)
            await self.store.transition(run.op_id, "running", allowed_from={"starting"})
            exit_code = await self._wait_with_deadline(run)
            ending = await self.engine.conclude(run.container_id, cfg.log_tail_lines)
            await self._collect_outcome(run)
            await self._finish(run, ending, exit_code)
            await self.engine.remove(run.container_id)
            run.removed = True
        except InfrastructureError as exc:
            await self._fail(run, "infrastructure", str(exc))
        except KtrdrError as exc:
            await self._fail(run, "infrastructure", str(exc))
        except Exception as exc:
            log.exception("op %s: dispatcher error", run.op_id)
            await self._fail(run, "dispatcher_error", f"{type(exc).__name__}: {exc}")
        finally:
            if run.container_id and not run.removed:
                with contextlib.suppress(Exception):
                    await self.engine.remove(run.container_id)
            keepalive.cancel()
            progress_writer.cancel()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self.ledger.release(run.op_id)
            self._runs.pop(run.op_id, None)
            with contextlib.suppress(Exception):
                await run.msg.ack()
            self._slot_freed.set()

    async def _keep_lease(self, msg: Msg) -> None:
        interval_s = self.config.dispatcher.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _wait_with_deadline(self, run: OpRun) -> int:
        waiting = asyncio.ensure_future(self.engine.wait(run.container_id))
        timeout_s = run.job.timeout_s
        try:
            if timeout_s is None:
                return await waiting
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
            except TimeoutError:
                run.timed_out = True
                log.info("op %s: timeout of %gs reached; stopping container", run.op_id, timeout_s)
                await self.engine.stop(run.container_id, self.config.dispatcher.cancel_grace_s)
                return await waiting
        finally:
            run.exited.set()

    async def _on_event(self, run: OpRun, msg: Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(event, ProgressEvent):
            run.progress = ProgressSnapshot(
                percent=event.percent,
                step=event.step,
                message=event.message,
                metrics=event.metrics,
                ts=event.ts,
            )
            run.progress_dirty.set()
        elif isinstance(event, ResultEvent):
            run.result = event
        elif isinstance(event, ErrorEvent):
            run.error = event
        elif isinstance(event, CancelAckEvent):
            run.cancel_ack = event

    async def _write_progress(self, run: OpRun) -> None:
        interval_s = self.config.dispatcher.progress_record_interval_s
        while True:
            await run.progress_dirty.wait()
            run.progress_dirty.clear()
            snapshot = run.progress

            def mutate(record: OpRecord, snap: ProgressSnapshot | None = snapshot) -> OpRecord | None:
                if record.terminal or snap is None:
                    return None
                return msgspec.structs.replace(record, progress=snap)

            with contextlib.suppress(Exception):
                await self.store.update(run.op_id, mutate)
            await asyncio.sleep(interval_s)

    async def _collect_outcome(self, run: OpRun) -> None:
        """Make sure the op's own outcome event is known: it was published with an ack
        before the container exited, so the stream has it even if our subscription
        has not delivered it yet."""
        if run.result or run.error or run.cancel_ack:
            return
        for kind in ("result", "error", "cancel_ack"):
            try:
                raw = await self.js.get_last_msg(EVENTS_STREAM, op_subject(run.op_id, kind))
            except Exception:
                continue
            event = event_decoder.decode(raw.data or b"{}")
            if event.ts < run.started_ts - 1.0:
                continue  # from an earlier attempt
            if isinstance(event, ResultEvent):
                run.result = event
            elif isinstance(event, ErrorEvent):
                run.error = event
            elif isinstance(event, CancelAckEvent):
                run.cancel_ack = event

    async def _finish(self, run: OpRun, ending: ContainerExit, exit_code: int) -> None:
        common: dict[str, Any] = {"exit_code": exit_code, "log_tail": ending.log_tail}
        if run.progress is not None:
            common["progress"] = run.progress
        active = {"running", "starting", "placing"}
        if run.timed_out:
            await self.store.transition(
                run.op_id,
                "timed_out",
                allowed_from=active,
                error=ErrorInfo(reason="timeout", message=f"timed out after {run.job.timeout_s:g}s"),
                **common,
            )
        elif run.cancel_requested is not None or run.cancel_ack is not None:
            intent = CancelIntent(
                requested_at=run.cancel_requested.ts if run.cancel_requested else now(),
                reason=run.cancel_requested.reason if run.cancel_requested else "",
                acked=run.cancel_ack is not None,
                forced=run.forced,
            )
            await self.store.transition(run.op_id, "cancelled", allowed_from=active, cancel=intent, **common)
        elif exit_code == 0 and run.result is not None:
            await self.store.transition(
                run.op_id,
                "completed",
                allowed_from=active,
                result=run.result.result,
                artifacts=run.result.artifacts,
                **common,
            )
        else:
            if ending.oom_killed:
                error = ErrorInfo(reason="oom_killed", message="the kernel killed the op: out of memory")
            elif run.error is not None:
                error = ErrorInfo(
                    reason=run.error.reason,
                    message=run.error.message,
                    error_type=run.error.error_type,
                    field=run.error.field,
                    traceback=run.error.traceback,
                )
            elif exit_code == 0:
                error = ErrorInfo(reason="no_result", message="the runner exited without publishing a result")
            else:
                tail = ending.log_tail[-1] if ending.log_tail else ""
                error = ErrorInfo(
                    reason="exit_nonzero",
                    message=f"container exited with code {exit_code}: {tail}".rstrip(": "),
                )
            await self.store.transition(run.op_id, "failed", allowed_from=active, error=error, **common)

    async def _fail(self, run: OpRun, reason: str, message: str) -> None:
        log.warning("op %s failed (%s): %s", run.op_id, reason, message)
        await self.store.transition(
            run.op_id,
            "failed",
            allowed_from={"queued", "placing", "starting", "running"},
            error=ErrorInfo(reason=reason, message=message),
        )

    # -- cancel ------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        op_id = msg.subject[len(OPS_SUBJECT_ROOT) + 1 : -len(".cancel")]
        try:
            request = event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            request = CancelRequest(op_id=op_id, ts=now())
        if not isinstance(request, CancelRequest):
            return
        run = self._runs.get(op_id)
        if run is None:
            record = await self.store.find(op_id)
            if record is not None and record.state == "queued":
                await self.store.transition(
                    op_id,
                    "cancelled",
                    allowed_from={"queued"},
                    cancel=CancelIntent(requested_at=request.ts, reason=request.reason),
                    message="cancelled before start; no container was created",
                )
            return
        if run.cancel_requested is not None:
            return
        run.cancel_requested = request

        def mutate(record: OpRecord) -> OpRecord | None:
            if record.terminal:
                return None
            return msgspec.structs.replace(
                record, cancel=CancelIntent(requested_at=request.ts, reason=request.reason)
            )

        await self.store.update(op_id, mutate)
        log.info("op %s: cancel requested (%s)", op_id, request.reason or "no reason")
        task = asyncio.create_task(self._enforce_cancel(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enforce_cancel(self, run: OpRun) -> None:
        grace_s = self.config.dispatcher.cancel_grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.exited.wait(), grace_s)
            return
        if run.container_id:
            run.forced = True
            log.info("op %s: no cancel ack within %gs; stopping container", run.op_id, grace_s)
            await self.engine.stop(run.container_id, 2.0)


def _peek_ids(msg: Msg) -> tuple[str, str]:
    """Best-effort job_id and kind from a message that failed validation."""
    kind = msg.subject[len(JOBS_SUBJECT_ROOT) + 1 :]
    try:
        data = json.loads(msg.data)
    except ValueError:
        return "", kind
    if not isinstance(data, dict):
        return "", kind
    job_id = data.get("job_id")
    return (job_id if isinstance(job_id, str) and is_valid_id(job_id) else ""), kind


def new_job_id() -> str:
    """A fresh, sortable job id."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
