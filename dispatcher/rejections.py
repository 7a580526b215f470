"""Job messages that will never run: rejected at admission, or dead-lettered.

Either way the job's op (when its id is usable) ends ``failed`` with the reason — a new
record, or the queued one of a requeued op — so anyone following it gets an answer, and
the message leaves the queue.
"""

from __future__ import annotations

import contextlib
import logging

from nats.js import JetStreamContext

from dispatcher.admission import Rejected, peek_ids
from dispatcher.joblease import JobLease
from dispatcher.opstore import OpStore, retrying
from runner.protocol import (
    DeadLetter,
    ErrorEvent,
    ErrorInfo,
    OpRecord,
    dead_letter_subject,
    encode,
    now,
    op_subject,
    parse_job_subject,
    rejected_subject,
)

log = logging.getLogger("ktrdr.dispatcher")


async def reject(
    js: JetStreamContext, store: OpStore, lease: JobLease, exc: Rejected, *, touch_record: bool = True
) -> None:
    """A job that cannot run: error events, and the op ends ``failed`` with the reason
    (unless ``touch_record`` is False: the id belongs to another op)."""
    job = exc.job
    job_id, kind = (job.job_id, job.kind) if job else peek_ids(lease.subject, lease.data)
    event = ErrorEvent(
        op_id=job_id or "",
        ts=now(),
        reason="invalid_job",
        message=str(exc),
        error_type=exc.error_type,
        field=exc.field,
    )
    log.warning("rejected job %s on %s: %s", job_id or "(no usable job_id)", lease.subject, exc)
    await retrying(lambda: js.publish(rejected_subject(kind or "unknown"), encode(event)), what="reject")
    if job_id and touch_record:
        await fail_unstarted(js, store, job_id, kind, event)
    await lease.ack()


async def fail_unstarted(
    js: JetStreamContext, store: OpStore, job_id: str, kind: str, event: ErrorEvent
) -> None:
    """Record ``failed`` for an op that never started: a new record, or a queued one."""
    error = ErrorInfo(
        reason=event.reason, message=event.message, error_type=event.error_type, field=event.field
    )
    existing = await store.find(job_id)
    if existing is not None and existing.state != "queued":
        return
    await retrying(lambda: js.publish(op_subject(job_id, "error"), encode(event)), what="error event")
    if existing is None:
        record = OpRecord(
            op_id=job_id, kind=kind or "", state="failed", timestamps={"failed": now()}, error=error
        )
        await store.create(record)
    else:
        await store.transition(job_id, "failed", allowed_from={"queued"}, error=error)


async def dead_letter(
    js: JetStreamContext, store: OpStore, lease: JobLease, reason: str, dispatcher_id: str
) -> None:
    """Give up on a job message: to ``ktrdr.dead.<kind>`` with the reason, never again."""
    kind, _ = parse_job_subject(lease.subject)
    job_id, _ = peek_ids(lease.subject, lease.data)
    letter = DeadLetter(
        subject=lease.subject,
        reason=reason,
        data=lease.data.decode("utf-8", "replace"),
        deliveries=lease.deliveries,
        ts=now(),
        job_id=job_id,
        dispatcher=dispatcher_id,
    )
    log.error(
        "job %s dead-lettered after %d deliveries: %s", job_id or lease.subject, lease.deliveries, reason
    )
    await retrying(lambda: js.publish(dead_letter_subject(kind), encode(letter)), what="dead letter")
    if job_id:
        event = ErrorEvent(op_id=job_id, ts=now(), reason="dead_letter", message=reason)
        with contextlib.suppress(Exception):  # the dead letter is what matters
            await fail_unstarted(js, store, job_id, kind, event)
    await lease.term()
