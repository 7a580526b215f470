"""Job messages that will never run: rejected at admission, or dead-lettered.

Either way the job's op (when its id is usable) ends ``failed`` with the reason — a new
record, or the queued one when the message is that op's own job (a requeue of it, or a
redelivery) — so anyone following it gets an answer, and the message leaves the queue.
Another message that merely names an existing op's id (a typo, a reuse, garbage) gets its
rejection and leaves that op alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from dispatcher.admission import Rejected, peek_ids, resolve_resources
from dispatcher.joblease import JobLease
from dispatcher.opstore import OpStore, retrying
from runner import registry
from runner.protocol import (
    DeadLetter,
    ErrorEvent,
    ErrorInfo,
    Job,
    OpRecord,
    dead_letter_subject,
    encode,
    job_decoder,
    now,
    op_subject,
    params_digest,
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
        await fail_unstarted(js, store, job_id, kind, event, subject=lease.subject, job=job)
    await lease.ack()


def _resolved_dir(raw: str) -> str:
    try:
        return str(Path(raw).expanduser().resolve())
    except (ValueError, RuntimeError, OSError):
        return ""


def made_of(record: OpRecord, subject: str, job: Job | None) -> bool:
    """Whether ``job`` (decoded from a message on ``subject``) is the job ``record`` was
    made of: the same kind, submitter, params, resources, timeout, labels and data
    directory (a requeue carries exactly these). An undecodable message never is."""
    if job is None:
        return False
    subject_kind, submitter = parse_job_subject(subject)
    if submitter:  # as admission records it: the name the server let the publisher use
        job = msgspec.structs.replace(job, submitted_by=submitter)
    if not subject_kind == job.kind == record.kind:
        return False
    try:
        resources = resolve_resources(job, registry.get(job.kind))
    except Exception:  # noqa: BLE001 - a kind this dispatcher does not know: not the op's
        return False
    same_dir = job.data_dir in ("", record.data_dir) or _resolved_dir(job.data_dir) == record.data_dir
    return (
        params_digest(job.params) == record.params_digest
        and job.submitted_by == record.submitted_by
        and resources == record.resources
        and job.timeout_s == record.timeout_s
        and job.labels == record.labels
        and same_dir
    )


def _decoded(data: bytes) -> Job | None:
    try:
        return job_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None


async def fail_unstarted(
    js: JetStreamContext,
    store: OpStore,
    job_id: str,
    kind: str,
    event: ErrorEvent,
    *,
    subject: str = "",
    job: Job | None = None,
) -> None:
    """Record ``failed`` for an op that never started: a new record, or a queued one when
    ``job`` (the message's, from ``subject``) is the one it was made of."""
    error = ErrorInfo(
        reason=event.reason, message=event.message, error_type=event.error_type, field=event.field
    )
    existing = await store.find(job_id)
    if existing is not None and existing.state != "queued":
        return
    # (off the event loop: comparing data directories resolves links on the filesystem)
    if existing is not None and not await asyncio.to_thread(made_of, existing, subject, job):
        log.info("op %s is queued from another job message: the rejected one leaves it alone", job_id)
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
            await fail_unstarted(
                js, store, job_id, kind, event, subject=lease.subject, job=_decoded(lease.data)
            )
    await lease.term()
