"""Op records in KV ``ktrdr_ops``: created once, changed only by compare-and-set.

Every state change publishes a ``status`` event, so observers that read the event
stream see the same transitions as those that watch the bucket. A transition into a
terminal state succeeds at most once per op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
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


class OpStore:
    """Reads and compare-and-set writes of op records."""

    def __init__(self, kv: KeyValue, js: JetStreamContext):
        self.kv = kv
        self.js = js

    async def create(self, record: OpRecord) -> bool:
        """Create the record; False when an op with this id already exists (the claim)."""
        try:
            await self.kv.create(record.op_id, encode(record))
        except KeyWrongLastSequenceError:
            return False
        await self._publish_status(record)
        return True

    async def get(self, op_id: str) -> tuple[OpRecord, int]:
        """The record and its KV revision; OpNotFound if there is none."""
        try:
            entry = await self.kv.get(op_id)
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
            try:
                await self.kv.update(op_id, encode(updated), last=revision)
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
        await self.js.publish(op_subject(record.op_id, "status"), encode(event))

    async def list(self) -> list[OpRecord]:
        """Every op record in the bucket."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        records = []
        for key in keys:
            record = await self.find(key)
            if record is not None:
                records.append(record)
        return records
