"""Op records in KV ``ktrdr_ops``: created once, changed only by compare-and-set.

Every state change publishes a ``status`` event, so observers that read the event
stream see the same transitions as those that watch the bucket. A transition into a
terminal state succeeds at most once per op.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from dispatcher.errors import OpNotFound
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


class OpStore:
    """Reads and compare-and-set writes of op records.

    Every call rides out short NATS outages. A record's terminal write carries a
    per-message TTL of ``retention_s`` (when set): JetStream itself removes finished
    records after that time; live records never expire.
    """

    def __init__(self, kv: KeyValue, js: JetStreamContext, *, retention_s: float | None = None):
        self.kv = kv
        self.js = js
        self.retention_s = retention_s

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
        await self._publish_status(record)
        return True

    async def get(self, op_id: str) -> tuple[OpRecord, int]:
        """The record and its KV revision; OpNotFound if there is none."""
        try:
            entry = await retrying(lambda: self.kv.get(op_id), what=f"read op {op_id}")
        except KeyNotFoundError:
            raise OpNotFound(op_id) from None
        if entry.value is None:
            raise OpNotFound(op_id)
        return record_decoder.decode(entry.value), int(entry.revision or 0)

    async def find(self, op_id: str) -> OpRecord | None:
        """The record, or None."""
        try:
            return (await self.get(op_id))[0]
        except OpNotFound:
            return None

    async def update(self, op_id: str, mutate: Mutation) -> OpRecord | None:
        """Apply ``mutate`` by compare-and-set, retrying on conflict.

        ``mutate`` returns the new record, or None to leave it unchanged (then this
        returns None).
        """
        while True:
            current, revision = await self.get(op_id)
            updated = mutate(current)
            if updated is None:
                return None
            ttl = self.retention_s if updated.terminal else None
            try:
                # kv.update has no TTL argument; _update is what it calls, with one.
                await retrying(
                    functools.partial(self.kv._update, op_id, encode(updated), last=revision, msg_ttl=ttl),
                    what=f"update op {op_id}",
                )
                return updated
            except KeyWrongLastSequenceError:
                continue

    async def transition(
        self,
        op_id: str,
        state: str,
        *,
        allowed_from: Iterable[str],
        message: str = "",
        **changes: Any,
    ) -> OpRecord | None:
        """Move the op to ``state`` if it is now in one of ``allowed_from``.

        Returns the new record, or None when the op was elsewhere (someone else moved
        it, or it is already terminal). Publishes the status event on success.
        """
        allowed = frozenset(allowed_from) - TERMINAL_STATES

        def mutate(record: OpRecord) -> OpRecord | None:
            if record.state not in allowed:
                return None
            stamps = dict(record.timestamps)
            stamps[state] = now()
            return msgspec.structs.replace(record, state=state, timestamps=stamps, **changes)

        updated = await self.update(op_id, mutate)
        if updated is not None:
            log.info("op %s -> %s%s", op_id, state, f" on {updated.host}" if updated.host else "")
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

    async def list(self) -> list[OpRecord]:
        """Every op record in the bucket."""
        try:
            keys = await retrying(self.kv.keys, what="list ops")
        except NoKeysError:
            return []
        records = []
        for key in keys:
            try:
                record = await self.find(key)
            except msgspec.DecodeError as exc:
                log.warning("op record %s is unreadable (%s); skipped", key, exc)
                continue
            if record is not None:
                records.append(record)
        return records
