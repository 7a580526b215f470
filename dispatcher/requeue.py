"""Operator requeue: an ended op (failed, cancelled, timed out) runs again as a new
attempt of the same op.

People's tools send a :class:`~runner.protocol.RequeueRequest` to ``ktrdr.ctl.requeue``
(request/reply, one dispatcher of the queue group answers). The dispatcher moves the
record from its terminal state back to ``queued`` by compare-and-set, so of two
requests racing for one op exactly one wins; the ended run goes into the record's
``history`` with who asked for the next one. Then it publishes the op's job message
again, exactly as an infrastructure retry does, and the op is placed like any other.

Cancels published before the requeue belonged to the ended run: the record's cancel floor
moves past them. Who asked is the credential's name when the request came on a named
subject (``ktrdr.ctl.requeue.<name>``, all a named submitter may use), else what the
request says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from dispatcher.intake import last_event_seq, rejected_earlier
from dispatcher.opstore import OpStore
from runner.errors import describe_validation_error
from runner.protocol import (
    REQUEUABLE_STATES,
    REQUEUE_SUBJECT,
    SUBMITTER_PATTERN,
    EndedAttempt,
    OpRecord,
    RequeueReply,
    RequeueRequest,
    encode,
    is_valid_id,
    now,
)

log = logging.getLogger("ktrdr.dispatcher")

#: The queue group: one dispatcher answers each request.
REQUEUE_QUEUE = "ktrdr-requeue"

_request_decoder = msgspec.json.Decoder(RequeueRequest)


class Refused(Exception):  # control flow inside this module: the reply's error
    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(message)


def refusal(record: OpRecord) -> Refused | None:
    """Why ``record`` may not be requeued, or None when it may."""
    op_id = record.op_id
    if record.state == "completed":
        return Refused(
            "OpCompleted",
            f"op {op_id} completed: a completed op is not run again "
            "(submit the job under a new id to run it again)",
        )
    if record.state not in REQUEUABLE_STATES:
        hint = (
            "it is waiting to run already"
            if record.state == "queued"
            else f"cancel it first (`ktrdr-run ops cancel {op_id} --wait`), then requeue it"
        )
        return Refused(
            "OpNotEnded",
            f"op {op_id} is {record.state}: only a failed, cancelled or timed-out op is requeued; {hint}",
        )
    if rejected_earlier(record):
        why = record.error.message if record.error else ""
        return Refused(
            "NeverAdmitted",
            f"op {op_id} was rejected when it was submitted ({why}): it has nothing to run again; "
            "fix the job and submit it under a new id",
        )
    if record.parent_id:
        return Refused(
            "PartOfSweep",
            f"op {op_id} is a chunk of sweep {record.parent_id}: its sweep decides what runs; "
            "submit the sweep again under a new id",
        )
    if record.children:
        return Refused(
            "HasChildren",
            f"op {op_id} is a sweep that started {len(record.children)} chunk op(s): a sweep is not "
            "requeued; submit it again under a new id",
        )
    return None


def reopened(record: OpRecord, *, by: str, reason: str, cancel_floor_seq: int, dispatcher: str) -> OpRecord:
    """``record`` queued again: its ended run appended to ``history``, everything of that
    run cleared. ``dispatcher`` (the requeuer) is named so that, should it die before the
    job message is out, another dispatcher's reconciliation publishes it."""
    at = now()
    ended = EndedAttempt(
        attempt=record.attempts,
        state=record.state,
        host=record.host,
        container_id=record.container_id,
        exit_code=record.exit_code,
        error=record.error,
        artifacts=record.artifacts,
        timestamps=record.timestamps,
        requeued_at=at,
        requeued_by=by,
        requeue_reason=reason,
    )
    return msgspec.structs.replace(
        record,
        state="queued",
        history=[*record.history, ended],
        timestamps={"queued": at},
        host="",
        container_id="",
        image="",
        dispatcher=dispatcher,
        progress=None,
        result=None,
        artifacts={},
        error=None,
        exit_code=None,
        log_tail=[],
        cancel=None,
        retry_at=0.0,
        cancel_floor_seq=max(record.cancel_floor_seq, cancel_floor_seq),
    )


class Requeuer:
    """Answers requeue requests for one dispatcher (not a one-shot command's)."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        store: OpStore,
        *,
        dispatcher_id: str,
        publish_job: Callable[[OpRecord], Awaitable[None]],
    ) -> None:
        self._nc = nc
        self._js = js
        self._store = store
        self._dispatcher_id = dispatcher_id
        self._publish_job = publish_job
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Answer on the open subject and on every named one (queue group)."""
        self._subs = [
            await self._nc.subscribe(REQUEUE_SUBJECT, queue=REQUEUE_QUEUE, cb=self._on_request),
            await self._nc.subscribe(f"{REQUEUE_SUBJECT}.*", queue=REQUEUE_QUEUE, cb=self._on_request),
        ]

    async def stop(self) -> None:
        """Stop answering; requests being handled finish first."""
        for sub in self._subs:
            with contextlib.suppress(Exception):  # a closed connection has no subscriptions left
                await sub.unsubscribe()
        self._subs = []
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # off the subscription's callback: a slow KV write must not hold the next request
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg.subject, msg.data)
        except Exception as exc:
            log.exception("requeue request on %s failed", msg.subject)
            reply = RequeueReply(
                op_id="", requeued=False, error=f"requeue failed: {exc}", error_type="Internal"
            )
        if msg.reply:
            with contextlib.suppress(Exception):  # the asker gave up; the requeue stands
                await msg.respond(encode(reply))

    async def handle(self, subject: str, data: bytes) -> RequeueReply:
        """Requeue the op a request names, or say why not."""
        try:
            request = _request_decoder.decode(data)
        except msgspec.ValidationError as exc:
            where, problem = describe_validation_error(exc)
            return _refused("", "InvalidRequest", f"invalid requeue request: {where or 'message'}: {problem}")
        except (msgspec.DecodeError, RecursionError) as exc:
            return _refused("", "InvalidRequest", f"requeue request is not valid JSON: {exc}")
        if not is_valid_id(request.op_id):
            return _refused(request.op_id, "InvalidRequest", f"op_id: {request.op_id!r} is not an op id")
        named = subject[len(REQUEUE_SUBJECT) + 1 :] if subject.startswith(REQUEUE_SUBJECT + ".") else ""
        if named and not re.fullmatch(SUBMITTER_PATTERN, named):
            return _refused(
                request.op_id, "InvalidRequest", f"subject {subject!r}: the name is not one token"
            )
        by = named or request.requested_by or "unknown"
        record = await self._store.find(request.op_id)
        if record is None:
            return _refused(
                request.op_id,
                "OpNotFound",
                f"no op {request.op_id}: ended ops are kept for [retention] ops_s "
                "(`ktrdr-run ops list` shows them)",
            )
        refused = refusal(record)
        if refused is not None:
            return _refused(request.op_id, refused.error_type, str(refused))
        floor = max(
            await last_event_seq(self._js, record.op_id, "status"),
            await last_event_seq(self._js, record.op_id, "cancel"),
        )

        def mutate(current: OpRecord) -> OpRecord | None:
            if refusal(current) is not None or current.attempts != record.attempts:
                return None  # it changed meanwhile (another requeue won)
            return reopened(
                current, by=by, reason=request.reason, cancel_floor_seq=floor, dispatcher=self._dispatcher_id
            )

        updated = await self._store.reopen(
            record.op_id,
            mutate,
            message=f"requeued by {by}" + (f": {request.reason}" if request.reason else ""),
        )
        if updated is None:
            now_record = await self._store.find(request.op_id)
            state = now_record.state if now_record else "gone"
            return _refused(
                request.op_id,
                "Conflict",
                f"op {request.op_id} changed while it was being requeued (it is {state} now)",
            )
        await self._publish_job(updated)
        log.info(
            "op %s: requeued by %s after attempt %d ended %s", record.op_id, by, record.attempts, record.state
        )
        return RequeueReply(op_id=record.op_id, requeued=True, state=updated.state)


def _refused(op_id: str, error_type: str, message: str) -> RequeueReply:
    log.info("requeue of op %s refused (%s): %s", op_id or "?", error_type, message)
    return RequeueReply(op_id=op_id, requeued=False, error=message, error_type=error_type)
