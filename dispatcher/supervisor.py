"""Running one attempt of one op: start its container, watch it, record its one outcome.

::

    placing ─▶ create hardened container ─▶ starting ─▶ start ─▶ running
      ─▶ watch: fold the runner's events (this attempt's only) into the record, stream
         the container's output as log events, enforce timeout and cancel, check that
         the runner is alive (first heartbeat within runner_ready_s, then no silence
         longer than heartbeat_timeout_s while NATS is up)
      ─▶ the container exits (engine events) ─▶ inspect, log tail ─▶ one terminal state
      ─▶ remove the container

Every record write names its owner (this dispatcher, this attempt): when another
dispatcher took the op over, :class:`OwnershipLost` stops this one from touching the op
again, and from touching the container unless the new owner did not adopt it.
Infrastructure failures put the op back in the queue (a fresh job message, with
backoff) until ``max_attempts``; a host that stops answering makes the op ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from discovery.gpu import device_requests, is_no_gpu_runtime_error
from dispatcher.config import Config
from dispatcher.engine import ContainerVanished, DockerEngine, hardened_host_config
from dispatcher.errors import EngineGone, EngineUnreachable, InfrastructureError, KtrdrError, OwnershipLost
from dispatcher.fleet import Fleet
from dispatcher.intake import cancel_unstarted, intent_of
from dispatcher.logstream import stream_logs
from dispatcher.metrics import Metrics
from dispatcher.opstore import OpStore, Owner, retrying
from dispatcher.outcome import OpRun, classify
from dispatcher.placement import Placement
from dispatcher.pool import WarmPool
from dispatcher.reachability import hint
from dispatcher.runner_access import RunnerAccess
from runner.protocol import (
    ACTIVE_STATES,
    EVENTS_STREAM,
    EXIT_NOT_ASSIGNED,
    CancelRequest,
    ErrorInfo,
    Job,
    LogEvent,
    OpRecord,
    ProgressEvent,
    ProgressSnapshot,
    RunnerSpec,
    StatusEvent,
    container_name,
    encode,
    event_decoder,
    job_subject,
    now,
    op_events_filter,
    op_subject,
)
from runner.transport import redact_url

log = logging.getLogger("ktrdr.supervisor")

MAX_RETRY_DELAY_S = 60.0
#: Published job messages the one-shot dispatcher must handle itself: (sequence) -> None.
OnRequeued = Callable[[int], Awaitable[None]]


class Lost(KtrdrError):
    """The attempt ended without an outcome of its own (host gone, runner silent)."""


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


def requeue_msg_id(record: OpRecord) -> str:
    """The Nats-Msg-Id of the job message that puts ``record`` back in the queue: unique per
    requeue, and the same when it is published again (a crashed requeuer's op)."""
    return f"{record.op_id}-q{int(record.timestamps.get('queued', 0.0) * 1000)}"


class Supervisor:
    """Runs op attempts for one dispatcher."""

    def __init__(
        self,
        config: Config,
        nc: NATS,
        js: JetStreamContext,
        store: OpStore,
        placement: Placement,
        fleet: Fleet,
        dispatcher_id: str,
        image_on: Callable[[DockerEngine, bool], Awaitable[str]],
        on_requeued: OnRequeued | None = None,
        access: RunnerAccess | None = None,
        pool: WarmPool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.access = access or RunnerAccess()
        self.nc = nc
        self.js = js
        self.store = store
        self.placement = placement
        self.fleet = fleet
        self.dispatcher_id = dispatcher_id
        self._image_on = image_on
        self._on_requeued = on_requeued
        self._runner_urls: dict[str, str] = {}
        self._hints: dict[str, str] = {}
        #: The deployment's id (set by the dispatcher at start), labelled on containers.
        self.deployment = ""

    # -- one attempt, start to end -----------------------------------------------------

    async def supervise(self, run: OpRun, record: OpRecord, *, adopted: bool) -> None:
        """Own one attempt until the op is terminal, back in the queue, or taken over."""
        # listen before the container starts: the runner's first heartbeat must not be missed
        sub = await self.nc.subscribe(op_events_filter(run.op_id), cb=functools.partial(self._on_event, run))
        try:
            try:
                if not adopted and not await self._start_container(run, record):
                    return
                await self._watch(run)
            except OwnershipLost:
                raise
            except (EngineUnreachable, ContainerVanished, Lost) as exc:
                # a refused connection is a dead engine; one slow answer is not: the health
                # checks (failure_threshold in a row) decide that. The attempt is lost
                if isinstance(exc, EngineGone):
                    self.fleet.mark_down(run.reservation.host.name, str(exc))
                await self._requeue_lost(run, str(exc))
            except InfrastructureError as exc:
                if is_no_gpu_runtime_error(str(exc)) and run.reservation.gpu_ids:
                    # the host claims GPUs its engine cannot run: place the op again, not failed
                    self.fleet.mark_no_gpu(run.reservation.host.name)
                    await self._replace(run, f"host {run.reservation.host.name} has no usable GPU runtime")
                else:
                    await self._retry_or_fail(run, str(exc))
            except KtrdrError as exc:
                await self._retry_or_fail(run, str(exc))
            except Exception as exc:
                log.exception("op %s: dispatcher error", run.op_id)
                await self.fail(run.op_id, run.owner, "dispatcher_error", f"{type(exc).__name__}: {exc}")
        except OwnershipLost as exc:
            await self._let_go(run, exc)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if run.container_id and not run.removed and self.fleet.usable(run.reservation.host.name):
                with contextlib.suppress(Exception):
                    await run.engine.remove(run.container_id)
            with contextlib.suppress(Exception):
                await self.placement.release(run.reservation)
            if self.pool is not None:
                if run.warm is not None:  # taken for it, but it never got that far
                    self.pool.put_back(run.warm)
                self.pool.wake()  # the room it held may take a warm container again

    async def _let_go(self, run: OpRun, lost: OwnershipLost) -> None:
        """Another dispatcher owns the op now: stop touching it. Our container stays when the
        new owner adopted it; otherwise it is an orphan of our attempt and goes."""
        log.warning("op %s: %s; letting go of attempt %d", run.op_id, lost, run.attempt)
        current = await self.store.find(run.op_id)
        if current is not None and run.container_id and current.container_id == run.container_id:
            run.removed = True  # adopted: the new owner follows and removes it

    async def _start_container(self, run: OpRun, record: OpRecord) -> bool:
        """placing → starting → running; False when the op was cancelled meanwhile."""
        cfg = self.config.dispatcher
        image = await self._image_on(run.engine, bool(run.reservation.gpu_ids))
        if run.cancel_requested is not None:
            intent = intent_of(run.cancel_requested)
            await cancel_unstarted(
                self.store, run.op_id, intent, allowed_from=frozenset({"placing"}), owner=run.owner
            )
            return False
        run.runner_url = await self.runner_url(run.reservation.host.name, run.engine)
        spec = RunnerSpec(
            op_id=run.op_id,
            kind=run.job.kind,
            params=run.job.params,
            nats_url=run.runner_url,
            attempt=run.attempt,
            heartbeat_s=cfg.heartbeat_s,
            result_deadline_s=cfg.result_deadline_s,
            host=run.reservation.host.name,
            # the runner gives up a little before the dispatcher does, and says why
            ready_s=max(1.0, cfg.runner_ready_s * 0.7),
            cancel_after_seq=record.cancel_floor_seq,
            creds_stdin=self.access.authority is not None,
        )
        creds = self.access.credentials(run.op_id, run.job.timeout_s, cfg)
        host_config = hardened_host_config(
            run.engine.api,
            record.resources,
            pids_limit=cfg.pids_limit,
            scratch_mb=cfg.scratch_mb,
            data_dir=record.data_dir,
            device_requests=device_requests(list(run.reservation.gpu_ids), 0),
        )
        warm, run.warm = run.warm, None  # taken for it when it was placed, if its shape has a pool
        if warm is not None and self.pool is not None:
            warm = await self.pool.claim(warm, container_name(run.op_id, run.attempt), run.op_id)
        if warm is not None:
            run.container_id = warm.container_id
        else:
            run.container_id = await run.engine.create(
                image=image,
                name=container_name(run.op_id, run.attempt),
                op_id=run.op_id,
                kind=run.job.kind,
                dispatcher_id=self.dispatcher_id,
                attempt=run.attempt,
                deployment=self.deployment,
                spec_json=encode(spec).decode(),
                host_config=host_config,
                stdin_secret=bool(creds),
            )
        await self.store.transition(
            run.op_id,
            "starting",
            allowed_from={"placing"},
            owner=run.owner,
            image=image,
            container_id=run.container_id,
        )
        run.started_ts = now()
        if warm is not None:  # the spec and credentials exist in it from now on only
            await warm.assign(encode(spec).decode(), creds)
        else:
            await run.engine.start(run.container_id, stdin=creds)
        run.running_ts = now()
        run.last_seen = time.monotonic()
        await self.store.transition(run.op_id, "running", allowed_from={"starting"}, owner=run.owner)
        return True

    async def runner_url(self, host_name: str, engine: DockerEngine) -> str:
        """The NATS URL containers on a host use: the host's own setting, the configured
        one, or this connection's address as seen from the engine's bridge."""
        host = self.fleet.host(host_name)
        if host is not None and host.labels.get("nats_url"):
            return host.labels["nats_url"]
        if self.config.nats.runner_url:
            return self.config.nats.runner_url
        if host_name not in self._runner_urls:
            connected = self.nc.connected_url.geturl() if self.nc.connected_url else self.config.nats.url
            if "," in self.config.nats.url:  # a cluster: every node, so runners outlive one's loss
                connected = self.config.nats.url
            url = await engine.call(engine.runner_nats_url, connected)
            if self.access.expose is not None:  # an embedded server answers there too
                await self.access.expose(urlparse(url).hostname or "")
            self._runner_urls[host_name] = url
        return self._runner_urls[host_name]

    # -- watching ------------------------------------------------------------------------

    async def _watch(self, run: OpRun) -> None:
        """Follow a started container to its end, then record the outcome and remove it."""
        cfg = self.config.dispatcher
        progress_writer = asyncio.create_task(self._write_progress(run))
        logs = asyncio.create_task(self._stream_logs(run))
        liveness = asyncio.create_task(self._check_liveness(run))
        try:
            exit_code = await self._wait_for_exit(run)
            if run.abort_reason == "ownership_lost":
                raise OwnershipLost(run.op_id, "", run.attempt)
            if run.abort_reason in ("host_down", "lost"):
                raise Lost(run.abort_message)
            if exit_code == EXIT_NOT_ASSIGNED and not run.seen_runner:
                # a warm container whose input closed before the op reached it (its
                # dispatcher died in between): the op never started
                raise Lost("its warm container never received the op")
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
                        raise EngineGone(f"engine {run.engine.name} went away while the op ran")
            if reason == "runner_unreachable":
                fields["error"] = msgspec.structs.replace(
                    fields["error"], message=f"{fields['error'].message}. {await self._hint(run.runner_url)}"
                )
            done = await self.store.transition(
                run.op_id, state, allowed_from=ACTIVE_STATES, owner=run.owner, **fields
            )
            if done is not None:
                log.info("op %s: %s on %s (attempt %d)", run.op_id, state, run.engine.name, run.attempt)
            await run.engine.remove(run.container_id)
            run.removed = True
        finally:
            for task in (progress_writer, logs, liveness):
                task.cancel()

    async def _wait_for_exit(self, run: OpRun) -> int:
        """The container's exit code; enforces the op's timeout and any abort on the way."""
        cfg = self.config.dispatcher
        exiting = asyncio.ensure_future(run.engine.wait(run.container_id))
        aborted = asyncio.ensure_future(run.aborted.wait())
        try:
            timeout_s = run.job.timeout_s
            left_s = None
            if timeout_s is not None:
                left_s = max(0.0, timeout_s - (now() - run.running_ts if run.running_ts else 0.0))
            done, _ = await asyncio.wait(
                {exiting, aborted}, timeout=left_s, return_when=asyncio.FIRST_COMPLETED
            )
            if exiting in done:
                return exiting.result()
            if not done:
                run.timed_out = True
                log.info("op %s: timeout of %gs reached; stopping container", run.op_id, timeout_s)
                await self.stop_if_owner(run, cfg.cancel_grace_s)
            elif run.abort_reason in ("host_down", "ownership_lost"):
                exiting.cancel()
                return -1  # nothing more to ask of this engine / this op
            else:
                log.info("op %s: %s; stopping container", run.op_id, run.abort_message)
                await self.stop_if_owner(run, 0.0)
            # the stop returned, so the engine answers: the exit follows within moments
            grace_s = cfg.cancel_grace_s + run.engine.call_timeout_s
            try:
                return await asyncio.wait_for(asyncio.shield(exiting), grace_s)
            except TimeoutError:
                raise EngineUnreachable(
                    f"engine {run.engine.name} did not report the exit of {run.container_id[:12]} "
                    f"within {grace_s:g}s of stopping it"
                ) from None
        finally:
            aborted.cancel()
            if not exiting.done():
                exiting.cancel()
            run.exited.set()

    async def stop_if_owner(self, run: OpRun, grace_s: float) -> None:
        """Stop the container, unless another dispatcher owns the op now (then the container
        is theirs, and :class:`OwnershipLost` is raised)."""
        current = await self.store.find(run.op_id)
        if current is None or not run.owner.holds(current):
            run.abort("ownership_lost", "another dispatcher owns the op now")
            raise OwnershipLost(run.op_id, current.dispatcher if current else "", run.attempt)
        await run.engine.stop(run.container_id, grace_s)

    async def _check_liveness(self, run: OpRun) -> None:
        """The runner must be heard from within runner_ready_s of the start, and then at
        least every heartbeat_timeout_s. Time while this dispatcher is cut off from NATS
        does not count: the silence may be ours."""
        cfg = self.config.dispatcher
        while True:
            await asyncio.sleep(min(1.0, cfg.heartbeat_s))
            if not self.nc.is_connected:
                run.last_seen = time.monotonic()
                continue
            silent_s = time.monotonic() - run.last_seen
            if not run.seen_runner and silent_s > cfg.runner_ready_s:
                run.abort(
                    "runner_unreachable",
                    f"the runner did not reach NATS at {redact_url(run.runner_url)} within "
                    f"{cfg.runner_ready_s:g}s of its container starting",
                )
                return
            if run.seen_runner and silent_s > cfg.heartbeat_timeout_s:
                run.abort("lost", f"no heartbeat from the runner for {silent_s:.0f}s")
                return

    async def _hint(self, url: str) -> str:
        if url not in self._hints:
            self._hints[url] = await asyncio.to_thread(hint, url)
        return self._hints[url]

    async def _on_event(self, run: OpRun, msg: Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(event, StatusEvent | LogEvent | CancelRequest):
            return  # the dispatcher's own events, and requests: not signs of the runner's life
        if event.attempt != run.attempt:
            return  # a late word from an earlier attempt's runner (or an earlier op's)
        if not run.seen_runner and run.running_ts and self.metrics is not None:
            self.metrics.runner_ready(run.job.kind, now() - run.running_ts)
        run.seen_runner = True
        run.last_seen = time.monotonic()
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

            try:
                await self.store.update(run.op_id, mutate, owner=run.owner)
            except OwnershipLost:
                run.abort("ownership_lost", "another dispatcher owns the op now")
                return
            except Exception as exc:  # noqa: BLE001 - progress in the record is best effort
                log.debug("op %s: progress not recorded (%s)", run.op_id, exc)
            await asyncio.sleep(interval_s)

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
                run.engine.stream,
                run.op_id,
                publish,
                max_lines_per_s=self.config.dispatcher.log_lines_per_s,
            )

    async def _collect_outcome(self, run: OpRun) -> None:
        """Make sure this attempt's own outcome event is known: it was published with an ack
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
            try:
                event = event_decoder.decode(raw.data or b"{}")
            except (msgspec.DecodeError, RecursionError):
                continue  # not an event
            if event.attempt == run.attempt:  # not from an earlier attempt (or an earlier op)
                run.seen_runner = True
                run.note(event)

    # -- ending an attempt without an outcome of its own ---------------------------------

    async def _requeue_lost(self, run: OpRun, reason: str) -> None:
        """The attempt was lost (host gone, runner silent): back in the queue while
        attempts remain."""
        if self.last_attempt(run):
            await self.fail(
                run.op_id, run.owner, "lost", f"{reason} (attempt {run.attempt} of {run.attempt})"
            )
            return
        await self.requeue(run.op_id, reason, owner=run.owner, delay_s=0.0, lost=True)

    async def _replace(self, run: OpRun, reason: str) -> None:
        """Place the op again at once, without spending an attempt (the host was wrong)."""
        if run.container_id and not run.removed:
            with contextlib.suppress(Exception):
                await run.engine.remove(run.container_id)
            run.removed = True
        await self.requeue(run.op_id, reason, owner=run.owner, delay_s=0.0, attempts=run.attempt - 1)

    async def _retry_or_fail(self, run: OpRun, reason: str) -> None:
        """An infrastructure failure: back to the queue with backoff, or failed at the
        last attempt with the last reason."""
        if self.last_attempt(run):
            await self.fail(
                run.op_id, run.owner, "infrastructure", f"{reason} (attempt {run.attempt} of {run.attempt})"
            )
            return
        delay_s = self.backoff_s(run.attempt)
        log.warning(
            "op %s attempt %d failed (%s); retrying in %.1fs", run.op_id, run.attempt, reason, delay_s
        )
        if run.container_id and not run.removed:
            with contextlib.suppress(Exception):
                await run.engine.remove(run.container_id)
            run.removed = True
        await self.requeue(run.op_id, reason, owner=run.owner, delay_s=delay_s)

    def last_attempt(self, run: OpRun) -> bool:
        """Whether ``run`` is the last attempt ``max_attempts`` allows (counted since an
        operator last requeued the op)."""
        return run.attempt - run.attempt_base >= self.config.dispatcher.max_attempts

    def backoff_s(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (doubling, capped)."""
        return min(MAX_RETRY_DELAY_S, self.config.dispatcher.retry_backoff_s * 2 ** max(0, attempt - 1))

    async def requeue(
        self,
        op_id: str,
        reason: str,
        *,
        owner: Owner,
        delay_s: float,
        lost: bool = False,
        attempts: int | None = None,
    ) -> None:
        """Put an op back in the queue: ``queued`` with its retry time, then a fresh job
        message (the one that brought the op here was acknowledged when it was claimed)."""
        allowed: set[str] = set(ACTIVE_STATES)
        if lost:
            await self.store.transition(op_id, "lost", allowed_from=allowed, owner=owner, message=reason)
            allowed = {"lost"}
        changes: dict[str, Any] = {"attempts": attempts} if attempts is not None else {}
        record = await self.store.transition(
            op_id,
            "queued",
            allowed_from=allowed,
            owner=owner,
            error=ErrorInfo(reason="lost" if lost else "infrastructure", message=reason),
            container_id="",
            retry_at=now() + delay_s,
            message=f"requeued: {reason}",
            **changes,
        )
        if record is not None:
            await self.publish_requeued(record)

    async def publish_requeued(self, record: OpRecord) -> None:
        """Publish the job message of a requeued op (idempotent per requeue)."""
        job = job_from_record(record)
        ack = await retrying(
            lambda: self.js.publish(
                job_subject(job.kind), encode(job), headers={"Nats-Msg-Id": requeue_msg_id(record)}
            ),
            what=f"requeue {record.op_id}",
        )
        if self._on_requeued is not None:
            await self._on_requeued(int(ack.seq))

    async def fail(self, op_id: str, owner: Owner | None, reason: str, message: str) -> None:
        """The op ends ``failed`` with ``reason``."""
        log.warning("op %s failed (%s): %s", op_id, reason, message)
        await self.store.transition(
            op_id,
            "failed",
            allowed_from={"queued", "lost", *ACTIVE_STATES},
            owner=owner,
            error=ErrorInfo(reason=reason, message=message),
        )
