"""The dispatcher: pull jobs, validate, claim, place, run one fresh container per op.

Flow of one job message::

    fetch ─▶ decode + validate (bad → error event, ack; never a container)
          ─▶ claim the op in KV (kv.create; an existing op id is a duplicate → ack)
          ─▶ reserve capacity (no room → nak with delay: the job waits in JetStream)
          ─▶ placing → starting (create hardened container) → running (start)
          ─▶ follow: fold events into the record, stream output as log events, keep the
             job message's lease, enforce timeout and cancel
          ─▶ container exits → inspect, log tail → one terminal state (compare-and-set)
          ─▶ remove the container → ack the job message

Infrastructure failures (image missing, engine refusing or unreachable) put the op back
in the queue with backoff until ``max_attempts``; an op's own failure is final. A job
message that keeps breaking the dispatcher goes to the dead-letter subject. On start the
dispatcher reconciles with what is on the engine (:mod:`dispatcher.reconcile`). Nothing of
an op runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import docker
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from discovery.base import DiscoveryError
from discovery.gpu import device_requests, is_no_gpu_runtime_error
from dispatcher.admission import Rejected, peek_ids, resolve_data_dir, resolve_resources, validate_job
from dispatcher.config import Config
from dispatcher.engine import DockerEngine, hardened_host_config
from dispatcher.errors import EngineUnreachable, InfrastructureError, KtrdrError
from dispatcher.fleet import Fleet, publish_hosts
from dispatcher.jetstream import JetStreamHandles, dispatcher_consumer_config
from dispatcher.logstream import stream_logs
from dispatcher.opstore import TRANSIENT_ERRORS, OpStore, retrying
from dispatcher.outcome import OpRun, classify
from dispatcher.placement import Placement, why_never_placeable
from runner.protocol import (
    ACTIVE_STATES,
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    JOBS_STREAM,
    JOBS_SUBJECT_ROOT,
    OPS_SUBJECT_ROOT,
    CancelIntent,
    CancelRequest,
    DeadLetter,
    DispatcherInfo,
    ErrorEvent,
    ErrorInfo,
    Job,
    LogEvent,
    OpRecord,
    ProgressEvent,
    ProgressSnapshot,
    RunnerSpec,
    dead_letter_subject,
    encode,
    event_decoder,
    job_subject,
    now,
    op_events_filter,
    op_subject,
    params_digest,
    rejected_subject,
)

log = logging.getLogger("ktrdr.dispatcher")

ImageProvider = Callable[[], str]
NAK_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 60.0


def job_from_record(record: OpRecord) -> Job:
    """The job an op record was made from (to requeue it, or to follow an adopted op)."""
    return Job(
        job_id=record.op_id,
        kind=record.kind,
        params=record.params,
        resources=record.resources,
        timeout_s=record.timeout_s,
        labels=record.labels,
        submitted_by=record.submitted_by,
        data_dir=record.data_dir,
    )


class Dispatcher:
    """Consumes the job queue and runs each op in a fresh container on ``engine``."""

    def __init__(
        self,
        config: Config,
        nc: NATS,
        handles: JetStreamHandles,
        fleet: Fleet,
        image: ImageProvider,
        *,
        image_source: docker.DockerClient | None = None,
    ) -> None:
        self.config = config
        self.nc = nc
        self.js: JetStreamContext = handles.js
        self.store = OpStore(handles.ops, handles.js, retention_s=config.retention.ops_s)
        self.fleet = fleet
        self.dispatcher_id = config.dispatcher.dispatcher_id or f"{socket.gethostname()}-{os.getpid()}"
        self.placement = Placement(handles.reservations, self.dispatcher_id)
        self.hosts_kv = handles.hosts
        self._image_provider = image
        self._image: str | None = None
        self._image_lock = asyncio.Lock()
        self.image_source: docker.DockerClient | None = image_source
        self.runs: dict[str, OpRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._failures: dict[int, int] = {}
        self._runner_urls: dict[str, str] = {}
        self._started_at = now()
        limit = config.dispatcher.max_concurrent_ops
        self.max_concurrent = limit or max(8, int(sum(h.cpus for h in fleet.all_hosts()) * 8))

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, burst: bool = False, idle_s: float = 1.0) -> None:
        """Consume jobs until :meth:`stop`; with ``burst`` return once the queue is empty
        and every op this dispatcher started has finished (deterministic tests)."""
        from dispatcher.reconcile import reconcile

        await self.js.add_consumer(JOBS_STREAM, dispatcher_consumer_config(self.config))
        psub = await self.js.pull_subscribe_bind(durable=DISPATCHER_CONSUMER, stream=JOBS_STREAM)
        subs = [
            await self.nc.subscribe(DISPATCHER_PING_SUBJECT, cb=self._on_ping),
            await self.nc.subscribe(f"{OPS_SUBJECT_ROOT}.*.cancel", cb=self._on_cancel),
        ]
        await self.fleet.refresh()
        hosts_task = asyncio.create_task(self._watch_hosts())
        try:
            await reconcile(self)
        except Exception:  # serve the queue even if reconciliation broke
            log.exception("dispatcher %s: reconciliation failed; continuing", self.dispatcher_id)
        log.info(
            "dispatcher %s ready on %s (max %d ops)",
            self.dispatcher_id,
            ", ".join(h.name for h in self.fleet.hosts()) or "no hosts yet",
            self.max_concurrent,
        )
        try:
            while not self._stopping.is_set():
                if len(self.runs) >= self.max_concurrent:
                    await self._wait_for_slot(idle_s)
                    continue
                try:
                    msgs = await psub.fetch(1, timeout=idle_s)
                except TimeoutError:
                    if burst and not self.runs and not self._tasks:
                        break
                    continue
                except TRANSIENT_ERRORS as exc:
                    log.info(
                        "dispatcher %s: NATS unavailable (%s); waiting",
                        self.dispatcher_id,
                        type(exc).__name__,
                    )
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    if not await self._accept_safely(msg):
                        await self._wait_for_slot(NAK_DELAY_S)
        finally:
            hosts_task.cancel()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            if self._tasks:
                log.info("dispatcher %s waiting for %d running ops", self.dispatcher_id, len(self.runs))
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stop(self) -> None:
        """Stop taking jobs; :meth:`run` returns once running ops have finished."""
        self._stopping.set()

    async def _watch_hosts(self) -> None:
        """Refresh and health-check hosts on an interval; publish the hosts snapshot."""
        interval_s = self.config.discovery.health_interval_s
        while True:
            try:
                await publish_hosts(self.fleet, self.placement, self.hosts_kv)
                await asyncio.sleep(interval_s)
                await self.fleet.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatcher %s: host refresh failed", self.dispatcher_id)
                await asyncio.sleep(interval_s)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task :meth:`run` waits for before it returns."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_for_slot(self, timeout_s: float) -> None:
        self._slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), timeout_s)

    async def _on_ping(self, msg: Msg) -> None:
        info = DispatcherInfo(
            dispatcher_id=self.dispatcher_id,
            host=",".join(h.name for h in self.fleet.hosts()),
            running_ops=len(self.runs),
            started_at=self._started_at,
        )
        await msg.respond(encode(info))

    # -- accepting a job ---------------------------------------------------------------

    async def _accept_safely(self, msg: Msg) -> bool:
        """Accept a job; a message that keeps breaking the dispatcher is dead-lettered."""
        try:
            return await self._accept(msg)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the queue
            seq = msg.metadata.sequence.stream if msg.metadata else 0
            failures = self._failures.get(seq, 0) + 1
            self._failures[seq] = failures
            reason = f"{type(exc).__name__}: {exc}"
            if failures >= self.config.dispatcher.poison_after_failures:
                await self._dead_letter(msg, reason, failures)
            else:
                log.warning("job message %d failed (%d time(s)): %s; retrying", seq, failures, reason)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self._backoff_s(failures))
            return True

    async def _dead_letter(self, msg: Msg, reason: str, failures: int) -> None:
        kind = msg.subject[len(JOBS_SUBJECT_ROOT) + 1 :]
        job_id, _ = peek_ids(msg)
        letter = DeadLetter(
            subject=msg.subject,
            reason=reason,
            data=msg.data.decode("utf-8", "replace"),
            deliveries=msg.metadata.num_delivered if msg.metadata else failures,
            ts=now(),
            job_id=job_id,
            dispatcher=self.dispatcher_id,
        )
        log.error("job %s dead-lettered after %d failures: %s", job_id or msg.subject, failures, reason)
        await retrying(lambda: self.js.publish(dead_letter_subject(kind), encode(letter)), what="dead letter")
        if job_id:
            event = ErrorEvent(op_id=job_id, ts=now(), reason="dead_letter", message=reason)
            with contextlib.suppress(Exception):
                await self.js.publish(op_subject(job_id, "error"), encode(event))
        await msg.term()
        if msg.metadata:
            self._failures.pop(msg.metadata.sequence.stream, None)

    async def _accept(self, msg: Msg) -> bool:
        """Handle one job message; False when it was put back for lack of capacity."""
        try:
            job, op = validate_job(msg, self.config)
        except Rejected as exc:
            await self._reject(msg, exc)
            return True
        resources = resolve_resources(job, op)
        if resources.gpu == "never" and resources.gpus:
            problem = Rejected(f"gpus={resources.gpus} with gpu: never", field="resources.gpus")
            await self._reject(msg, problem, job=job)
            return True
        hosts = self.fleet.hosts()
        unplaceable = why_never_placeable(hosts, resources, self.fleet.gpu_usable) if hosts else ""
        if unplaceable:
            field = "resources.gpu" if unplaceable.startswith("gpu:") else "resources"
            await self._reject(msg, Rejected(unplaceable, field=field, error_type="Unplaceable"), job=job)
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
            data_dir=resolve_data_dir(job, self.config),
            timestamps={"queued": now()},
        )
        if not await self.store.create(record):
            existing, _ = await self.store.get(job.job_id)
            if existing.state != "queued":
                log.info(
                    "op %s: duplicate job message (op is %s); not started again", job.job_id, existing.state
                )
                await msg.ack()
                return True
            record = existing
        if await self._cancel_requested_before_start(record):
            await msg.ack()
            return True
        reservation = await self.placement.reserve(job.job_id, resources, hosts, self.fleet.gpu_usable)
        if reservation is None:
            await msg.nak(delay=NAK_DELAY_S)
            return False
        try:
            engine = await self.fleet.engine(reservation.host)
        except DiscoveryError as exc:
            self.fleet.mark_down(reservation.host.name, str(exc))
            await self.placement.release(reservation)
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
            await self.placement.release(reservation)
            await msg.ack()
            return True
        if msg.metadata:
            self._failures.pop(msg.metadata.sequence.stream, None)
        run = OpRun(
            op_id=job.job_id,
            job=job,
            msg=msg,
            reservation=reservation,
            engine=engine,
            attempt=claimed.attempts,
        )
        self.runs[run.op_id] = run
        self.spawn(self._supervise(run, claimed, adopted=False))
        return True

    async def _reject(self, msg: Msg, exc: Rejected, job: Job | None = None) -> None:
        job_id, kind = (job.job_id, job.kind) if job else peek_ids(msg)
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
            except Exception:  # noqa: BLE001 - no cancel request for this op
                return False
            request = event_decoder.decode(raw.data or b"{}")
            if not isinstance(request, CancelRequest):
                return False
            intent = CancelIntent(
                requested_at=request.ts, reason=request.reason, requested_by=request.requested_by
            )
        else:
            intent = record.cancel
        done = await self.store.transition(
            record.op_id,
            "cancelled",
            allowed_from={"queued"},
            cancel=intent,
            message="cancelled before start; no container was created",
        )
        return done is not None

    # -- running an op -----------------------------------------------------------------

    async def _image_tag(self) -> str:
        async with self._image_lock:
            if self._image is None:
                self._image = await asyncio.to_thread(self._image_provider)
            return self._image

    async def _image_on(self, engine: DockerEngine) -> str:
        """The runner image's tag, present on ``engine``."""
        tag = await self._image_tag()
        await self.fleet.ensure_image(engine, tag, self.image_source)
        return tag

    async def _runner_url(self, run: OpRun) -> str:
        """The NATS URL containers on the op's host use: the host's own setting, the
        configured one, or this connection's address as seen from the engine's bridge."""
        host = run.reservation.host
        if host.labels.get("nats_url"):
            return host.labels["nats_url"]
        if self.config.nats.runner_url:
            return self.config.nats.runner_url
        if host.name not in self._runner_urls:
            connected = self.nc.connected_url.geturl() if self.nc.connected_url else self.config.nats.url
            self._runner_urls[host.name] = await run.engine.call(run.engine.runner_nats_url, connected)
        return self._runner_urls[host.name]

    def _backoff_s(self, attempt: int) -> float:
        return min(MAX_RETRY_DELAY_S, self.config.dispatcher.retry_backoff_s * 2 ** max(0, attempt - 1))

    async def _supervise(self, run: OpRun, record: OpRecord, *, adopted: bool) -> None:
        """Own one op until it is terminal or back in the queue; never leaves it hanging."""
        keepalive = asyncio.create_task(self._keep_lease(run.msg)) if run.msg else None
        try:
            if not adopted and not await self._start_container(run, record):
                return
            await self._watch(run)
        except EngineUnreachable as exc:
            # the host stopped answering: its ops are lost and go elsewhere
            self.fleet.mark_down(run.reservation.host.name, str(exc))
            await self._requeue_lost(run, f"host {run.reservation.host.name} stopped answering: {exc}")
        except InfrastructureError as exc:
            if is_no_gpu_runtime_error(str(exc)) and run.reservation.gpu_ids:
                # the host claims GPUs its engine cannot run: place the op again, not failed
                self.fleet.mark_no_gpu(run.reservation.host.name)
                await self._replace(run, f"host {run.reservation.host.name} has no usable GPU runtime")
            else:
                if "image missing" in str(exc):
                    self._image = None  # build or find it again on the next attempt
                await self._retry_or_fail(run, str(exc))
        except KtrdrError as exc:
            await self._retry_or_fail(run, str(exc))
        except Exception as exc:
            log.exception("op %s: dispatcher error", run.op_id)
            await self._fail(run, "dispatcher_error", f"{type(exc).__name__}: {exc}")
        finally:
            if keepalive is not None:
                keepalive.cancel()
            if run.container_id and not run.removed and not self.fleet.is_down(run.reservation.host.name):
                with contextlib.suppress(Exception):
                    await run.engine.remove(run.container_id)
            with contextlib.suppress(Exception):
                await self.placement.release(run.reservation)
            self.runs.pop(run.op_id, None)
            if run.msg is not None and not run.requeued:
                with contextlib.suppress(Exception):
                    await run.msg.ack()
            self._slot_freed.set()

    async def _start_container(self, run: OpRun, record: OpRecord) -> bool:
        """placing → starting → running; False when the op was cancelled meanwhile."""
        cfg = self.config.dispatcher
        image = await self._image_on(run.engine)
        if run.cancel_requested is not None:
            await self.store.transition(
                run.op_id,
                "cancelled",
                allowed_from={"placing"},
                cancel=CancelIntent(requested_at=run.cancel_requested.ts, reason=run.cancel_requested.reason),
                message="cancelled before start; no container was created",
            )
            return False
        spec = RunnerSpec(
            op_id=run.op_id,
            kind=run.job.kind,
            params=run.job.params,
            nats_url=await self._runner_url(run),
            attempt=record.attempts,
            heartbeat_s=cfg.heartbeat_s,
            result_deadline_s=cfg.result_deadline_s,
            host=run.reservation.host.name,
        )
        host_config = hardened_host_config(
            run.engine.api,
            record.resources,
            pids_limit=cfg.pids_limit,
            scratch_mb=cfg.scratch_mb,
            data_dir=record.data_dir,
            device_requests=device_requests(list(run.reservation.gpu_ids), 0),
        )
        run.container_id = await run.engine.create(
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
        await run.engine.start(run.container_id)
        run.running_ts = now()
        await self.store.transition(run.op_id, "running", allowed_from={"starting"})
        return True

    async def _watch(self, run: OpRun) -> None:
        """Follow a started container to its end, then record the outcome and remove it."""
        cfg = self.config.dispatcher
        sub = await self.nc.subscribe(op_events_filter(run.op_id), cb=functools.partial(self._on_event, run))
        progress_writer = asyncio.create_task(self._write_progress(run))
        logs = asyncio.create_task(self._stream_logs(run))
        try:
            exit_code = await self._wait_with_deadline(run)
            ending = await run.engine.conclude(run.container_id, cfg.log_tail_lines)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(logs), 2.0)  # the last lines, as events
            await self._collect_outcome(run)
            state, fields = classify(run, ending, exit_code)
            reason = fields["error"].reason if state == "failed" else ""
            if reason == "stopped_externally" or (reason == "exit_nonzero" and exit_code in (130, 137, 143)):
                # stopped, not by us and not by the kernel: is the engine itself going away?
                # (a daemon shutting down stops its containers first, then stops answering)
                for _ in range(10):
                    await asyncio.sleep(0.5)
                    if not await run.engine.alive():
                        raise EngineUnreachable(f"engine {run.engine.name} went away while the op ran")
            await self.store.transition(run.op_id, state, allowed_from=ACTIVE_STATES, **fields)
            await run.engine.remove(run.container_id)
            run.removed = True
        finally:
            progress_writer.cancel()
            logs.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _stream_logs(self, run: OpRun) -> None:
        def read_chunks() -> Any:
            since_ts = run.logs_since or run.running_ts
            since = int(since_ts) if since_ts else None
            return run.engine.api.logs(
                run.container_id, stream=True, follow=True, stdout=True, stderr=True, since=since
            )

        async def publish(event: LogEvent) -> None:
            with contextlib.suppress(Exception):
                await self.nc.publish(op_subject(run.op_id, "log"), encode(event))

        with contextlib.suppress(Exception):
            await stream_logs(
                read_chunks,
                lambda fn: run.engine.call(fn),
                run.op_id,
                publish,
                max_lines_per_s=self.config.dispatcher.log_lines_per_s,
            )

    async def _requeue_lost(self, run: OpRun, reason: str) -> None:
        """The op's host is gone: ``lost``, then back in the queue while attempts remain."""
        if run.attempt >= self.config.dispatcher.max_attempts:
            await self._fail(run, "lost", f"{reason} (attempt {run.attempt} of {run.attempt})")
            return
        await self.requeue(run.op_id, reason, allowed_from=ACTIVE_STATES, delay_s=0.0, msg=run.msg, lost=True)
        run.requeued = run.msg is not None

    async def _replace(self, run: OpRun, reason: str) -> None:
        """Place the op again at once, without spending an attempt (the host was wrong)."""
        if run.container_id and not run.removed:
            with contextlib.suppress(Exception):
                await run.engine.remove(run.container_id)
            run.removed = True
        await self.requeue(
            run.op_id, reason, allowed_from=ACTIVE_STATES, delay_s=0.0, msg=run.msg, attempts=run.attempt - 1
        )
        run.requeued = run.msg is not None

    async def _retry_or_fail(self, run: OpRun, reason: str) -> None:
        """An infrastructure failure: back to the queue with backoff, or failed at the
        last attempt with the last reason."""
        if run.attempt >= self.config.dispatcher.max_attempts:
            await self._fail(run, "infrastructure", f"{reason} (attempt {run.attempt} of {run.attempt})")
            return
        delay_s = self._backoff_s(run.attempt)
        log.warning(
            "op %s attempt %d failed (%s); retrying in %.1fs", run.op_id, run.attempt, reason, delay_s
        )
        if run.container_id and not run.removed:
            with contextlib.suppress(Exception):
                await run.engine.remove(run.container_id)
            run.removed = True
        await self.requeue(run.op_id, reason, allowed_from=ACTIVE_STATES, delay_s=delay_s, msg=run.msg)
        run.requeued = run.msg is not None

    async def requeue(
        self,
        op_id: str,
        reason: str,
        *,
        allowed_from: set[str] | frozenset[str],
        delay_s: float,
        msg: Msg | None,
        lost: bool = False,
        attempts: int | None = None,
    ) -> None:
        """Put an op back in the queue: its job message is nak'ed with a delay, or (when we
        no longer hold it) the job is published again from the op record."""
        if lost:
            await self.store.transition(op_id, "lost", allowed_from=allowed_from, message=reason)
            allowed_from = {"lost"}
        changes: dict[str, Any] = {"attempts": attempts} if attempts is not None else {}
        record = await self.store.transition(
            op_id,
            "queued",
            allowed_from=allowed_from,
            error=ErrorInfo(reason="infrastructure" if not lost else "lost", message=reason),
            container_id="",
            message=f"requeued: {reason}",
            **changes,
        )
        if record is None:
            return
        if msg is not None:
            await msg.nak(delay=delay_s)
            return
        job = job_from_record(record)
        await retrying(
            lambda: self.js.publish(
                job_subject(job.kind),
                encode(job),
                headers={"Nats-Msg-Id": f"{op_id}-requeue-{record.attempts}"},
            ),
            what=f"requeue {op_id}",
        )

    async def _keep_lease(self, msg: Msg | None) -> None:
        if msg is None:
            return
        interval_s = self.config.dispatcher.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _wait_with_deadline(self, run: OpRun) -> int:
        waiting = asyncio.ensure_future(run.engine.wait(run.container_id))
        timeout_s = run.job.timeout_s
        try:
            if timeout_s is None:
                return await waiting
            elapsed_s = now() - run.running_ts if run.running_ts else 0.0
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, timeout_s - elapsed_s))
            except TimeoutError:
                run.timed_out = True
                log.info("op %s: timeout of %gs reached; stopping container", run.op_id, timeout_s)
                await run.engine.stop(run.container_id, self.config.dispatcher.cancel_grace_s)
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
        else:
            run.note(event)

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
        before the container exited, so the stream has it even if our subscription has
        not delivered it (or the op was adopted after a restart)."""
        if run.result or run.error or run.cancel_ack:
            return
        for kind in ("result", "error", "cancel_ack"):
            try:
                raw = await retrying(
                    functools.partial(self.js.get_last_msg, EVENTS_STREAM, op_subject(run.op_id, kind)),
                    what=f"read {kind} of {run.op_id}",
                    deadline_s=60.0,
                )
            except Exception:  # noqa: BLE001 - no such event
                continue
            event = event_decoder.decode(raw.data or b"{}")
            if event.ts >= run.started_ts - 1.0:  # not from an earlier attempt
                run.note(event)

    async def _fail(self, run: OpRun, reason: str, message: str) -> None:
        log.warning("op %s failed (%s): %s", run.op_id, reason, message)
        await self.store.transition(
            run.op_id,
            "failed",
            allowed_from={"queued", *ACTIVE_STATES},
            error=ErrorInfo(reason=reason, message=message),
        )

    # -- cancel ------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        op_id = msg.subject[len(OPS_SUBJECT_ROOT) + 1 : -len(".cancel")]
        try:
            request = event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            request = CancelRequest(op_id=op_id, ts=now())
        if isinstance(request, CancelRequest):
            await self.request_cancel(op_id, request)

    async def request_cancel(self, op_id: str, request: CancelRequest) -> None:
        """Record the cancel intent durably and enforce it: a queued op never starts; a
        running one gets ``cancel_grace_s`` to acknowledge, then SIGTERM, then SIGKILL."""
        intent = CancelIntent(
            requested_at=request.ts, reason=request.reason, requested_by=request.requested_by
        )
        run = self.runs.get(op_id)
        if run is None:
            record = await self.store.find(op_id)
            if record is not None and record.state == "queued":
                await self.store.transition(
                    op_id,
                    "cancelled",
                    allowed_from={"queued"},
                    cancel=intent,
                    message="cancelled before start; no container was created",
                )
            return
        if run.cancel_requested is not None:
            return
        run.cancel_requested = request

        def mutate(record: OpRecord) -> OpRecord | None:
            return None if record.terminal else msgspec.structs.replace(record, cancel=intent)

        await self.store.update(op_id, mutate)
        log.info("op %s: cancel requested (%s)", op_id, request.reason or "no reason")
        self.spawn(self._enforce_cancel(run))

    async def _enforce_cancel(self, run: OpRun) -> None:
        grace_s = self.config.dispatcher.cancel_grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.exited.wait(), grace_s)
            return
        if run.container_id:
            run.forced = True
            log.info("op %s: no cancel ack within %gs; stopping container", run.op_id, grace_s)
            await run.engine.stop(run.container_id, 2.0)


def new_job_id() -> str:
    """A fresh, sortable job id."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
