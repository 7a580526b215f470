"""Op records in KV ``ktrdr_ops``: created once, changed only by compare-and-set.

Every state change publishes a ``status`` event, so observers that read the event
stream see the same transitions as those that watch the bucket. A transition into a
terminal state succeeds at most once per op.

Fencing: a write made for an :class:`Owner` (one dispatcher, one attempt) first checks
that the record still names that owner, and raises :class:`OwnershipLost` when another
dispatcher took the op over. A write whose reply was lost (NATS timed out after the
server applied it) is recognised by reading the record back, never mistaken for a
conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from dispatcher.errors import OpNotFound, OwnershipLost
from dispatcher.kvwatch import SCAN_BATCH, scan_values, watch_entries
from runner.protocol import (
    TERMINAL_STATES,
    OpRecord,
    StatusEvent,
    encode,
    now,
    op_subject,
    record_decoder,
)

log = logging.getLogger("ktrdr.ops")

Mutation = Callable[[OpRecord], OpRecord | None]


# Errors that mean "NATS is unreachable right now", not "the request is wrong".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
)

T = TypeVar("T")


async def retrying(fn: Callable[[], Awaitable[T]], *, what: str, deadline_s: float = 600.0) -> T:
    """Run ``fn`` until it succeeds, riding out NATS outages (backoff up to 2 s) for up to
    ``deadline_s``; other errors propagate at once."""
    give_up = time.monotonic() + deadline_s
    delay_s = 0.1
    while True:
        try:
            return await fn()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() >= give_up:
                raise
            log.info("%s: NATS unavailable (%s); retrying in %.1fs", what, type(exc).__name__, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)


def _decoded(raw: Iterable[tuple[str, bytes | None]]) -> list[OpRecord]:
    """The records of ``(where, bytes)`` pairs; an unreadable one is logged and skipped."""
    records: list[OpRecord] = []
    for where, data in raw:
        try:
            records.append(record_decoder.decode(data or b""))
        except msgspec.DecodeError as exc:
            log.warning("op record %s is unreadable (%s); skipped", where, exc)
    return records


@dataclass(frozen=True, slots=True)
class Owner:
    """Who may write an op record: one dispatcher, for one attempt of the op."""

    dispatcher: str
    attempt: int

    def holds(self, record: OpRecord) -> bool:
        """Whether ``record`` still names this owner."""
        return record.dispatcher == self.dispatcher and record.attempts == self.attempt


class OpStore:
    """Reads and compare-and-set writes of op records.

    Every call rides out short NATS outages. A record's terminal write carries a
    per-message TTL of ``retention_s`` (when set): JetStream itself removes finished
    records after that time; live records never expire.
    """

    def __init__(
        self,
        kv: KeyValue,
        js: JetStreamContext,
        *,
        retention_s: float | None = None,
        observer: Callable[[OpRecord | None, OpRecord], None] | None = None,
    ):
        self.kv = kv
        self.js = js
        self.retention_s = retention_s
        #: Told of each record this store wrote: (before, after); before None when created.
        self.observer = observer

    async def create(self, record: OpRecord) -> bool:
        """Create the record; False when an op with this id already exists (the claim)."""
        ttl = self.retention_s if record.terminal else None

        async def create() -> bool:
            try:
                await self.kv.create(record.op_id, encode(record), msg_ttl=ttl)
            except KeyWrongLastSequenceError:
                return False
            return True

        if not await retrying(create, what=f"create op {record.op_id}"):
            return False
        if self.observer is not None:
            self.observer(None, record)
        await self._publish_status(record)
        return True

    async def _read(self, op_id: str) -> tuple[bytes, int]:
        try:
            entry = await retrying(lambda: self.kv.get(op_id), what=f"read op {op_id}")
        except KeyNotFoundError:
            raise OpNotFound(op_id) from None
        if entry.value is None:
            raise OpNotFound(op_id)
        return bytes(entry.value), int(entry.revision or 0)

    async def get(self, op_id: str) -> tuple[OpRecord, int]:
        """The record and its KV revision; OpNotFound if there is none."""
        raw, revision = await self._read(op_id)
        return record_decoder.decode(raw), revision

    async def find(self, op_id: str) -> OpRecord | None:
        """The record, or None."""
        try:
            return (await self.get(op_id))[0]
        except OpNotFound:
            return None

    async def update(self, op_id: str, mutate: Mutation, *, owner: Owner | None = None) -> OpRecord | None:
        """Apply ``mutate`` by compare-and-set, retrying on conflict.

        ``mutate`` returns the new record, or None to leave it unchanged (then this
        returns None). With ``owner``, :class:`OwnershipLost` is raised when the record
        no longer names that owner.
        """
        while True:
            raw, revision = await self._read(op_id)
            current = record_decoder.decode(raw)
            if owner is not None and not owner.holds(current):
                raise OwnershipLost(op_id, current.dispatcher, current.attempts)
            updated = mutate(current)
            if updated is None:
                return None
            if await self._write(op_id, updated, revision):
                if self.observer is not None:
                    self.observer(current, updated)
                return updated

    async def _write(self, op_id: str, updated: OpRecord, revision: int) -> bool:
        """One compare-and-set write; False on a conflict. A write whose reply was lost is
        settled by reading the record back: our bytes there mean it was applied."""
        data = encode(updated)
        ttl = self.retention_s if updated.terminal else None
        give_up = time.monotonic() + 600.0
        delay_s = 0.1
        while True:
            try:
                # kv.update has no TTL argument; _update is what it calls, with one.
                await self.kv._update(op_id, data, last=revision, msg_ttl=ttl)
                return True
            except KeyWrongLastSequenceError:
                return False
            except TRANSIENT_ERRORS as exc:
                if time.monotonic() >= give_up:
                    raise
                log.info("update op %s: NATS unavailable (%s); checking", op_id, type(exc).__name__)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
            raw, now_revision = await self._read(op_id)
            if raw == data and now_revision > revision:
                return True  # it was applied; only the reply was lost
            if now_revision != revision:
                return False  # someone else wrote in between: a real conflict

    async def transition(
        self,
        op_id: str,
        state: str,
        *,
        allowed_from: Iterable[str],
        owner: Owner | None = None,
        message: str = "",
        **changes: Any,
    ) -> OpRecord | None:
        """Move the op to ``state`` if it is now in one of ``allowed_from``.

        Returns the new record, or None when the op was elsewhere (someone else moved
        it, or it is already terminal). With ``owner``, raises :class:`OwnershipLost`
        when the op is no longer that owner's. Publishes the status event on success.
        """
        allowed = frozenset(allowed_from) - TERMINAL_STATES

        def mutate(record: OpRecord) -> OpRecord | None:
            if record.state not in allowed:
                return None
            stamps = dict(record.timestamps)
            stamps[state] = now()
            return msgspec.structs.replace(record, state=state, timestamps=stamps, **changes)

        updated = await self.update(op_id, mutate, owner=owner)
        if updated is not None:
            log.info("op %s -> %s%s", op_id, state, f" on {updated.host}" if updated.host else "")
            await self._publish_status(updated, message)
        return updated

    async def reopen(self, op_id: str, mutate: Mutation, *, message: str) -> OpRecord | None:
        """Apply ``mutate`` to an ended op and publish its new status (an operator's
        requeue: the one way out of a terminal state). ``mutate`` sees the current record
        and returns None to leave it (it is not terminal any more, or may not be reopened)."""

        def reopening(record: OpRecord) -> OpRecord | None:
            return mutate(record) if record.terminal else None

        updated = await self.update(op_id, reopening)
        if updated is not None:
            log.info("op %s -> %s (reopened)", op_id, updated.state)
            await self._publish_status(updated, message)
        return updated

    async def _publish_status(self, record: OpRecord, message: str = "") -> None:
        event = StatusEvent(
            op_id=record.op_id,
            ts=now(),
            state=record.state,
            host=record.host,
            container_id=record.container_id,
            attempt=record.attempts,
            message=message,
        )
        await retrying(
            lambda: self.js.publish(op_subject(record.op_id, "status"), encode(event)),
            what=f"publish status of {record.op_id}",
        )

    async def watch(self) -> AsyncGenerator[list[OpRecord], None]:
        """Batches of records: every current record first (one batch, maybe empty), then
        each record as it is written. Deleted, expired and unreadable records are skipped
        (see :mod:`dispatcher.kvwatch` for how the first batch ends)."""
        batches = watch_entries(self.kv)
        first = True
        try:
            async for entries in batches:
                records = _decoded((entry.key, entry.value) for entry in entries)
                if records or first:
                    yield records
                first = False
        finally:
            await batches.aclose()

    async def scan(self, batch: int = SCAN_BATCH) -> AsyncGenerator[list[OpRecord], None]:
        """Every op record, ``batch`` at a time, holding one batch in memory: the bucket
        keeps finished records for ``retention_s``, so a :meth:`list` of them all grows
        with every op run in that time (see :func:`dispatcher.kvwatch.scan_values`).
        Unreadable records are skipped."""
        async with contextlib.aclosing(scan_values(self.js, self.kv, batch)) as batches:
            async for msgs in batches:
                yield _decoded((msg.subject, msg.data) for msg in msgs)

    async def list(self) -> list[OpRecord]:
        """Every op record in the bucket (one pass over the bucket's current values)."""

        async def read_all() -> list[OpRecord]:
            batches = self.watch()
            try:
                return await anext(batches)
            finally:
                await batches.aclose()

        return await retrying(read_all, what="list ops")
