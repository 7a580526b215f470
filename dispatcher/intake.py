"""The op record of an admitted job: created ``queued`` (or found, for a requeue or a
redelivery), and a cancel published before any dispatcher saw the job honoured before
anything starts."""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext

from dispatcher.admission import Rejected
from dispatcher.joblease import JobLease
from dispatcher.opstore import OpStore, Owner
from dispatcher.rejections import reject
from runner.protocol import (
    EVENTS_STREAM,
    CancelIntent,
    CancelRequest,
    Job,
    OpRecord,
    Resources,
    event_decoder,
    now,
    op_subject,
    params_digest,
)

log = logging.getLogger("ktrdr.dispatcher")


async def queued_record(
    js: JetStreamContext, store: OpStore, lease: JobLease, job: Job, resources: Resources, data_dir: str
) -> OpRecord | None:
    """The op's record in ``queued``: created now, or the existing one (a requeue, or a
    redelivery of a job still waiting). None when the message needs nothing more."""
    digest = params_digest(job.params)
    record = OpRecord(
        op_id=job.job_id,
        kind=job.kind,
        params=job.params,
        params_digest=digest,
        resources=resources,
        timeout_s=job.timeout_s,
        labels=job.labels,
        submitted_by=job.submitted_by,
        data_dir=data_dir,
        parent_id=job.parent_id,
        timestamps={"queued": now()},
        cancel_floor_seq=await earlier_op_floor(js, job.job_id),
    )
    if await store.create(record):
        return record
    existing = await store.find(job.job_id)
    if existing is None:  # expired between the two reads: a new op after all
        return await queued_record(js, store, lease, job, resources, data_dir)
    if existing.kind != job.kind or (existing.params_digest and existing.params_digest != digest):
        problem = Rejected(
            f"job_id reused with different params: op {job.job_id} exists ({existing.state}) with "
            f"kind {existing.kind!r} and other params; pick a new job_id",
            field="job_id",
            error_type="JobIdReused",
        )
        await reject(js, store, lease, problem, touch_record=False)
        return None
    if rejected_earlier(existing):
        # an earlier message with this id was rejected (its op ended failed, never admitted):
        # this one is another job, and says so rather than being dropped as a duplicate
        why = existing.error.message if existing.error else ""
        problem = Rejected(
            f"job_id reused: op {job.job_id} was rejected earlier ({why}); pick a new job_id",
            field="job_id",
            error_type="JobIdReused",
        )
        await reject(js, store, lease, problem, touch_record=False)
        return None
    if existing.state != "queued":
        log.info("op %s: duplicate job message (op is %s); not started again", job.job_id, existing.state)
        await lease.ack()
        return None
    return existing


def rejected_earlier(record: OpRecord) -> bool:
    """Whether ``record`` is what a rejected job message left: ``failed`` at admission (or
    dead-lettered) without ever being admitted, so it holds no params."""
    return (
        record.state == "failed"
        and not record.params_digest
        and record.error is not None
        and record.error.reason in ("invalid_job", "dead_letter")
    )


async def last_event_seq(js: JetStreamContext, op_id: str, event: str) -> int:
    """The event-stream sequence of the op's last ``event`` (0: none)."""
    try:
        raw = await js.get_last_msg(EVENTS_STREAM, op_subject(op_id, event))
    except Exception:  # noqa: BLE001 - nothing was ever published there
        return 0
    return int(raw.seq or 0)


async def earlier_op_floor(js: JetStreamContext, op_id: str) -> int:
    """The event-stream sequence of the last status event of an earlier op with this id
    (its record expired): cancels up to it were meant for that op."""
    return await last_event_seq(js, op_id, "status")


async def stored_cancel(js: JetStreamContext, record: OpRecord) -> CancelRequest | None:
    """The op's cancel intent: recorded, or published while no dispatcher listened (a
    request stored at or below the record's floor was meant for an earlier op)."""
    if record.cancel is not None:
        return CancelRequest(
            op_id=record.op_id,
            ts=record.cancel.requested_at,
            reason=record.cancel.reason,
            requested_by=record.cancel.requested_by,
        )
    try:
        raw = await js.get_last_msg(EVENTS_STREAM, op_subject(record.op_id, "cancel"))
    except Exception:  # noqa: BLE001 - no cancel request for this op
        return None
    if int(raw.seq or 0) <= record.cancel_floor_seq:
        return None
    try:
        request = event_decoder.decode(raw.data or b"{}")
    except (msgspec.DecodeError, RecursionError):
        # a malformed request still means cancel (as the live path and the runner read it)
        return CancelRequest(op_id=record.op_id, ts=now())
    return request if isinstance(request, CancelRequest) else None


def intent_of(request: CancelRequest) -> CancelIntent:
    """The durable intent a cancel request records."""
    return CancelIntent(requested_at=request.ts, reason=request.reason, requested_by=request.requested_by)


async def cancel_unstarted(
    store: OpStore,
    op_id: str,
    intent: CancelIntent,
    *,
    allowed_from: frozenset[str] = frozenset({"queued"}),
    owner: Owner | None = None,
) -> bool:
    """End an op whose container was never created ``cancelled``; True when it moved."""
    done = await store.transition(
        op_id,
        "cancelled",
        allowed_from=allowed_from,
        owner=owner,
        cancel=intent,
        message="cancelled before start; no container was created",
    )
    return done is not None


async def cancel_before_start(js: JetStreamContext, store: OpStore, record: OpRecord) -> bool:
    """A cancel published before the dispatcher saw the job: the op ends ``cancelled``
    and no container is ever created. True when that happened."""
    request = await stored_cancel(js, record)
    if request is None:
        return False
    return await cancel_unstarted(store, record.op_id, record.cancel or intent_of(request))
