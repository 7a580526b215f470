"""The dispatcher: pull jobs, validate, claim, place, run one fresh container per op.

Flow of one job message::

    fetch ─▶ too many deliveries? → dead letter (JetStream's own count: it survives
             restarts and every dispatcher sees the same number)
          ─▶ decode + validate, off the event loop (bad → error event, ack; a requeued op
             that no longer passes → failed with the reason)
          ─▶ op record: created (queued), or the existing one when this is a requeue;
             a job id reused with other params is rejected
          ─▶ hold the message (in_progress) until the op's retry time and until it fits:
             reserve capacity (KV compare-and-set)
          ─▶ claim: queued → placing, naming this dispatcher and the attempt ─▶ ack
          ─▶ supervise the attempt (:mod:`dispatcher.supervisor`)

A service dispatcher also keeps a lease in KV ``ktrdr_dispatchers`` and takes over the
ops of dispatchers whose lease expired (:mod:`dispatcher.reconcile`); health checks
make the ops of a host that stops answering ``lost``. A one-shot command's in-process
dispatcher (``own_only``) handles only the jobs it published itself. Nothing of an op
runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import docker
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as ObjectNotFoundError

from dispatcher import reachability
from dispatcher.admission import Rejected, default_data_dir, resolve_resources, validate_job
from dispatcher.aiotasks import cancel_and_wait
from dispatcher.config import Config
from dispatcher.errors import OwnershipLost
from dispatcher.fleet import Fleet
from dispatcher.intake import cancel_before_start, cancel_unstarted, intent_of, queued_record
from dispatcher.jetstream import JetStreamHandles
from dispatcher.joblease import DirectLease, JobLease, QueueLease
from dispatcher.liveness import DispatcherLease, deployment_id
from dispatcher.metrics import LiveSources, Metrics
from dispatcher.opstore import TRANSIENT_ERRORS, OpStore, Owner, retrying
from dispatcher.outcome import OpRun
from dispatcher.placement import Placement, capacity_of, why_never_placeable
from dispatcher.pool import WarmPool
from dispatcher.rejections import dead_letter, reject
from dispatcher.requeue import Requeuer
from dispatcher.room import Room
from dispatcher.runner_access import RunnerAccess
from dispatcher.runner_images import ImageProvider, RunnerImages
from dispatcher.supervisor import Supervisor
from dispatcher.sweep_coordinator import CoordinatorDeps, SweepCoordinator
from dispatcher.uploads import UploadService
from runner.protocol import (
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    JOBS_STREAM,
    OPS_SUBJECT_ROOT,
    CancelRequest,
    DispatcherInfo,
    Job,
    OpRecord,
    encode,
    event_decoder,
    job_subject,
    now,
)

log = logging.getLogger("ktrdr.dispatcher")


class Dispatcher:
    """Consumes the job queue and runs each op in a fresh container on the fleet's hosts."""

    def __init__(
        self,
        config: Config,
        nc: NATS,
        handles: JetStreamHandles,
        fleet: Fleet,
        image: ImageProvider,
        *,
        image_source: docker.DockerClient | None = None,
        own_only: bool = False,
        check_reachability: bool = False,
        runner_access: RunnerAccess | None = None,
    ) -> None:
        self.config = config
        self.check_reachability = check_reachability
        self.nc = nc
        self.js: JetStreamContext = handles.js
        self.metrics = Metrics()
        self.store = OpStore(
            handles.ops, handles.js, retention_s=config.retention.ops_s, observer=self.metrics.observe
        )
        self.fleet = fleet
        self.dispatcher_id = config.dispatcher.dispatcher_id or f"{socket.gethostname()}-{os.getpid()}"
        self.own_only = own_only
        self.placement = Placement(handles.reservations, self.dispatcher_id)
        self.hosts_kv = handles.hosts
        self.artifacts = handles.artifacts
        # runners hold no object-store write: their artifacts come through this service
        self.uploads = UploadService(nc, handles.artifacts, may_upload=self._is_live)
        self.leases_kv = handles.dispatchers
        self.images = RunnerImages(fleet, image, source=image_source, config=config.images)
        self.runs: dict[str, OpRun] = {}
        self.sweeps: dict[str, SweepCoordinator] = {}  # coordinated ops (sweeps) run here
        self.claiming: set[str] = set()  # ops being claimed by this dispatcher right now
        # cancels that arrived while their op was being claimed: applied once it runs here
        self._early_cancels: dict[str, CancelRequest] = {}
        self._held: set[int] = set()  # job messages held, not yet claimed or rejected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._started_at = now()
        limit = config.dispatcher.max_concurrent_ops
        self.room = Room(
            config,
            self.store,
            self.placement,
            fleet,
            running=lambda: len(self.runs),
            max_concurrent=limit or max(8, int(sum(h.cpus for h in fleet.all_hosts()) * 8)),
            stopping=self._stopping,
        )
        # a one-shot command runs its own op or two: warming containers would be waste
        self.pool: WarmPool | None = None
        if config.pool.shapes and not own_only:
            data_dir = default_data_dir(config)
            self.pool = WarmPool(
                config,
                fleet,
                self.placement,
                self.images.on,
                self.dispatcher_id,
                data_dir=data_dir,
                starved=self.room.starved,
            )
            self.room.pool = self.pool
        self.lease = DispatcherLease(self.js, self.leases_kv, self._info, lease_s=config.dispatcher.lease_s)
        self.supervisor = Supervisor(
            config,
            nc,
            self.js,
            self.store,
            self.placement,
            fleet,
            self.dispatcher_id,
            self.images.on,
            on_requeued=self._handle_direct if own_only else None,
            access=runner_access,
            pool=self.pool,
            metrics=self.metrics,
        )
        # a one-shot command serves nobody else: operators' requeues go to the services
        self.requeuer = (
            None
            if own_only
            else Requeuer(
                nc,
                self.js,
                self.store,
                dispatcher_id=self.dispatcher_id,
                publish_job=self.supervisor.publish_requeued,
            )
        )
        self.metrics.watch(
            LiveSources(
                lambda: capacity_of(fleet.hosts(), self.placement.usage),
                self._pool_sizes,
                lambda: int(nc.stats["reconnects"]),
            )
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, burst: bool = False, idle_s: float = 1.0) -> None:
        """Serve until :meth:`stop`; with ``burst`` return once the queue is empty and
        every op this dispatcher started has finished (deterministic tests). A one-shot
        (``own_only``) dispatcher takes nothing from the queue: it runs what
        :meth:`submit_own` gives it."""
        from dispatcher.reconcile import reconcile, sweep, watch_hosts

        self.supervisor.deployment = await deployment_id(self.js)
        if self.pool is not None:
            self.pool.deployment = self.supervisor.deployment
        await self.lease.renew()
        background = [asyncio.create_task(self.lease.run(self._verify_ownership), name="lease")]
        await self.uploads.start()
        if self.requeuer is not None:
            await self.requeuer.start()
        stop_metrics = self.metrics.serve(self.config.metrics.listen) if self.config.metrics.listen else None
        subs = [
            await self.nc.subscribe(DISPATCHER_PING_SUBJECT, cb=self._on_ping),
            await self.nc.subscribe(f"{OPS_SUBJECT_ROOT}.*.cancel", cb=self._on_cancel),
        ]
        await self.fleet.refresh()
        background.append(asyncio.create_task(watch_hosts(self), name="watch-hosts"))
        if self.check_reachability:
            image_on = None if self.own_only else self.images.on  # one-shot: the quick check
            deployment, me = self.supervisor.deployment, self.dispatcher_id
            check = reachability.check_fleet(self.fleet, self.supervisor.runner_url, image_on, deployment, me)
            background.append(asyncio.create_task(check))
        psub = None
        try:
            if not self.own_only:
                try:
                    await reconcile(self)
                except Exception:  # serve the queue even if reconciliation broke
                    log.exception("dispatcher %s: reconciliation failed; continuing", self.dispatcher_id)
                background.append(asyncio.create_task(sweep(self), name="sweep"))
                if self.pool is not None:
                    background.append(asyncio.create_task(self.pool.run()))
                psub = await self.js.pull_subscribe_bind(durable=DISPATCHER_CONSUMER, stream=JOBS_STREAM)
            log.info(
                "dispatcher %s ready on %s (max %d ops%s)",
                self.dispatcher_id,
                ", ".join(h.name for h in self.fleet.hosts()) or "no hosts yet",
                self.room.max_concurrent,
                ", this command's own ops only" if self.own_only else "",
            )
            if psub is None:
                await self._stopping.wait()
            else:
                await self._serve_queue(psub, burst=burst, idle_s=idle_s)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self.requeuer is not None:
                await self.requeuer.stop()
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
            if self._tasks:
                log.info("dispatcher %s waiting for %d running ops", self.dispatcher_id, len(self.runs))
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await self.uploads.stop()
            if stop_metrics is not None:
                stop_metrics()
            await cancel_and_wait(background)
            await self.lease.release()

    async def _serve_queue(self, psub: Any, *, burst: bool, idle_s: float) -> None:
        cfg = self.config.dispatcher
        while not self._stopping.is_set():
            if (
                len(self.runs) + len(self._held) >= self.room.max_concurrent
                or len(self._held) >= cfg.max_waiting_jobs
            ):
                await self.room.wait_for_slot(idle_s)
                continue
            try:
                msgs = await psub.fetch(1, timeout=idle_s)
            except TimeoutError:
                if burst and not self.runs and not self._tasks:
                    break
                continue
            except TRANSIENT_ERRORS as exc:
                log.info(
                    "dispatcher %s: NATS unavailable (%s); waiting", self.dispatcher_id, type(exc).__name__
                )
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                self._take(QueueLease(msg))

    def stop(self) -> None:
        """Stop taking jobs; :meth:`run` returns once running ops have finished. Sweeps are
        let go of (their children still need a queue): the next dispatcher resumes them."""
        self._stopping.set()
        for coordinator in self.sweeps.values():
            coordinator.detach()
        self.room.free_slot()

    async def _publish(self, job: Job) -> Any:
        """Publish a job message (idempotent: its id is the message id); the stream's ack."""
        return await retrying(
            lambda: self.js.publish(job_subject(job.kind), encode(job), headers={"Nats-Msg-Id": job.job_id}),
            what=f"submit {job.job_id}",
        )

    async def submit_own(self, job: Job) -> None:
        """Publish a job and run it here (one-shot commands): only this job is taken."""
        ack = await self._publish(job)
        await self._handle_direct(int(ack.seq))

    async def _submit_child(self, job: Job) -> None:
        """Submit a child op: to the queue, or — in a one-shot command, whose dispatcher
        takes nothing from the queue — straight to this dispatcher."""
        if self.own_only:
            await self.submit_own(job)
        else:
            await self._publish(job)

    def coordinate(self, record: OpRecord, owner: Owner) -> asyncio.Task[Any]:
        """Run the coordinator of a coordinated op (a sweep) this dispatcher owns."""
        deps = CoordinatorDeps(
            nc=self.nc,
            js=self.js,
            store=self.store,
            artifacts=self.artifacts,
            placement=self.placement,
            hosts=self.fleet.hosts,
            submit=self._submit_child,
        )
        coordinator = SweepCoordinator(deps, record, owner)
        self.sweeps[record.op_id] = coordinator

        async def run() -> None:
            try:
                await coordinator.run()
            finally:
                if self.sweeps.get(record.op_id) is coordinator:
                    del self.sweeps[record.op_id]

        return self.spawn(run())

    async def _handle_direct(self, sequence: int) -> None:
        lease = await DirectLease.read(self.js, sequence)
        if lease is not None:
            self._take(lease)

    def _take(self, lease: JobLease) -> None:
        self._held.add(lease.sequence)
        self.spawn(self._handle(lease))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task :meth:`run` waits for before it returns."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _info(self) -> DispatcherInfo:
        return DispatcherInfo(
            dispatcher_id=self.dispatcher_id,
            host=",".join(h.name for h in self.fleet.hosts()),
            running_ops=len(self.runs),
            started_at=self._started_at,
        )

    async def _on_ping(self, msg: Msg) -> None:
        if not self.own_only:  # a one-shot command's dispatcher serves nobody else
            await msg.respond(encode(self._info()))

    # -- hosts, leases, reachability ----------------------------------------------------

    def _pool_sizes(self) -> dict[tuple[str, str], int]:
        return self.pool.sizes() if self.pool is not None else {}

    async def _is_live(self, op_id: str) -> bool:
        """Whether an op's container may be running now (so may upload artifacts)."""
        record = await self.store.find(op_id)
        return record is not None and record.state in ("starting", "running")

    async def _verify_ownership(self) -> None:
        """After a lease gap: every op this dispatcher runs may have been taken over."""
        for run in list(self.runs.values()):
            current = await self.store.find(run.op_id)
            if current is None or not run.owner.holds(current):
                run.abort("ownership_lost", "another dispatcher took the op over while this one was away")

    # -- handling a job message --------------------------------------------------------

    async def _handle(self, lease: JobLease) -> None:
        """Handle one job message; one that keeps breaking the dispatcher is dead-lettered."""
        cfg = self.config.dispatcher
        try:
            if lease.deliveries > cfg.poison_after_failures:
                reason = (
                    f"delivered {lease.deliveries} times without being handled "
                    "(the dispatcher died or failed on it each time)"
                )
                await dead_letter(self.js, self.store, lease, reason, self.dispatcher_id)
                return
            failures = 0
            while True:
                try:
                    await self._accept(lease)
                    return
                except Exception as exc:  # noqa: BLE001 - one bad message must not stop the queue
                    failures += 1
                    count = lease.deliveries if isinstance(lease, QueueLease) else failures
                    reason = f"{type(exc).__name__}: {exc}"
                    if count >= cfg.poison_after_failures:
                        await dead_letter(self.js, self.store, lease, reason, self.dispatcher_id)
                        return
                    log.warning(
                        "job message %d failed (%d time(s)): %s; retrying", lease.sequence, count, reason
                    )
                    if isinstance(lease, QueueLease):
                        with contextlib.suppress(Exception):
                            await lease.nak(self.supervisor.backoff_s(count))
                        return
                    await asyncio.sleep(self.supervisor.backoff_s(count))
        finally:
            self._held.discard(lease.sequence)
            self.room.free_slot()

    async def _accept(self, lease: JobLease) -> None:
        try:
            admitted = await asyncio.to_thread(
                validate_job, lease.subject, lease.data, self.config, own_job=self.own_only
            )
        except Rejected as exc:
            await reject(self.js, self.store, lease, exc)
            return
        job = admitted.job
        for field, name in admitted.reads.items():
            if not await self._artifact_exists(name):
                missing = f"{field}: no artifact {name!r} in the artifact store (expired, or never stored)"
                await reject(
                    self.js,
                    self.store,
                    lease,
                    Rejected(missing, field=field, error_type="ArtifactNotFound", job=job),
                )
                return
        resources = resolve_resources(job, admitted.op)
        if resources.gpu == "never" and resources.gpus:
            await reject(
                self.js,
                self.store,
                lease,
                Rejected(f"gpus={resources.gpus} with gpu: never", field="resources.gpus", job=job),
            )
            return
        hosts = self.fleet.hosts()
        unplaceable = why_never_placeable(hosts, resources, self.fleet.gpu_usable) if hosts else ""
        if unplaceable:
            field = "resources.gpu" if unplaceable.startswith("gpu:") else "resources"
            await reject(
                self.js,
                self.store,
                lease,
                Rejected(unplaceable, field=field, error_type="Unplaceable", job=job),
            )
            return
        record = await queued_record(self.js, self.store, lease, job, resources, admitted.data_dir)
        if record is None:
            return
        if await cancel_before_start(self.js, self.store, record):
            await lease.ack()
            return
        if admitted.op.coordinated:
            await self._start_coordinated(lease, record)
            return
        placed = await self.room.place(lease, job.job_id, resources)
        if placed is None:
            return
        reservation, warm = placed.reservation, placed.warm
        owner = Owner(self.dispatcher_id, placed.record.attempts + 1)
        self.claiming.add(job.job_id)
        try:
            claimed = await self.store.transition(
                job.job_id,
                "placing",
                allowed_from={"queued"},
                dispatcher=self.dispatcher_id,
                host=reservation.host.name,
                attempts=owner.attempt,
                retry_at=0.0,
            )
            if claimed is None:  # another dispatcher moved it first
                await self.placement.release(reservation)
                self.room.put_back(warm)
                await lease.ack()
                return
            run = OpRun(
                op_id=job.job_id,
                job=job,
                reservation=reservation,
                engine=placed.engine,
                owner=owner,
                attempt=owner.attempt,
                attempt_base=claimed.attempts_before_requeue,
                warm=warm,
            )
            self.runs[run.op_id] = run
        finally:
            self.claiming.discard(job.job_id)
            early = self._early_cancels.pop(job.job_id, None)
        if early is not None:
            await self.request_cancel(job.job_id, early)
        with contextlib.suppress(Exception):  # a lost ack only means a duplicate delivery later
            await lease.ack()
        self._held.discard(lease.sequence)
        try:
            await self.supervisor.supervise(run, claimed, adopted=False)
        finally:
            if self.runs.get(run.op_id) is run:  # a next attempt may be running already
                del self.runs[run.op_id]
            self.room.free_slot()

    async def _start_coordinated(self, lease: JobLease, record: OpRecord) -> None:
        """Claim a coordinated op (queued → running, no container) and coordinate it."""
        owner = Owner(self.dispatcher_id, record.attempts + 1)
        self.claiming.add(record.op_id)
        try:
            claimed = await self.store.transition(
                record.op_id,
                "running",
                allowed_from={"queued"},
                dispatcher=self.dispatcher_id,
                host="",
                attempts=owner.attempt,
                retry_at=0.0,
                message="coordinated by dispatcher " + self.dispatcher_id,
            )
            if claimed is not None:
                task = self.coordinate(claimed, owner)
        finally:
            self.claiming.discard(record.op_id)
            early = self._early_cancels.pop(record.op_id, None)
        with contextlib.suppress(Exception):
            await lease.ack()
        self._held.discard(lease.sequence)
        if claimed is not None:
            if early is not None:
                await self.request_cancel(record.op_id, early)
            await task

    async def _artifact_exists(self, name: str) -> bool:
        try:
            await retrying(lambda: self.artifacts.get_info(name), what=f"look up artifact {name}")
        except ObjectNotFoundError:
            return False
        return True

    # -- cancel ------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        op_id = msg.subject[len(OPS_SUBJECT_ROOT) + 1 : -len(".cancel")]
        try:
            request = event_decoder.decode(msg.data)
        except (msgspec.DecodeError, RecursionError):
            request = CancelRequest(op_id=op_id, ts=now())
        if isinstance(request, CancelRequest):
            try:
                await self.request_cancel(op_id, request)
            except OwnershipLost:
                pass  # another dispatcher owns the op now: it enforces the cancel

    async def request_cancel(self, op_id: str, request: CancelRequest) -> None:
        """Record the cancel intent durably and enforce it: a queued op never starts; a
        running one gets ``cancel_grace_s`` to acknowledge, then SIGTERM, then SIGKILL."""
        intent = intent_of(request)
        coordinator = self.sweeps.get(op_id)
        if coordinator is not None:
            coordinator.cancel(intent)
            log.info("sweep %s: cancel requested (%s)", op_id, request.reason or "no reason")
            return
        run = self.runs.get(op_id)
        if run is None and op_id in self.claiming:
            self._early_cancels[op_id] = request  # the claim is in flight: apply it after
            return
        if run is None:
            record = await self.store.find(op_id)
            if record is not None and record.state == "queued":
                await cancel_unstarted(self.store, op_id, intent)
            return
        if run.cancel_requested is not None:
            return
        run.cancel_requested = request

        def mutate(record: OpRecord) -> OpRecord | None:
            return None if record.terminal else msgspec.structs.replace(record, cancel=intent)

        await self.store.update(op_id, mutate, owner=run.owner)
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
            with contextlib.suppress(Exception):  # taken over, or an engine gone: not ours to stop
                await self.supervisor.stop_if_owner(run, 2.0)
