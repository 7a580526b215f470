"""A job message while a dispatcher handles it, however it got it.

A dispatcher service pulls job messages from the shared durable consumer
(:class:`QueueLease`). A one-shot command's in-process dispatcher handles only the jobs
it published itself: it reads each by its stream sequence and, once the op is claimed,
deletes it from the work queue (:class:`DirectLease`), so it never takes, delays or
counts other people's queued work.

A job message is held only until its op is claimed (or rejected): while it waits for
capacity or for its retry time, :meth:`in_progress` keeps the lease; afterwards the op
record and the owning dispatcher's lease carry the op.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from runner.protocol import JOBS_STREAM

log = logging.getLogger("ktrdr.joblease")


class JobLease(Protocol):
    """One job message being handled."""

    subject: str
    data: bytes

    @property
    def deliveries(self) -> int:
        """How many times JetStream has handed this message out (1 the first time)."""

    @property
    def sequence(self) -> int:
        """The message's sequence in the job stream."""

    async def ack(self) -> None:
        """Done with it: remove it from the queue."""

    async def nak(self, delay_s: float = 0.0) -> None:
        """Hand it back for another try after ``delay_s``."""

    async def in_progress(self) -> None:
        """Still working on it: extend the lease."""

    async def term(self) -> None:
        """Never deliver it again."""


class QueueLease:
    """A message pulled from the shared durable consumer."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject = msg.subject
        self.data = msg.data

    @property
    def deliveries(self) -> int:
        return int(self._msg.metadata.num_delivered or 1) if self._msg.metadata else 1

    @property
    def sequence(self) -> int:
        return int(self._msg.metadata.sequence.stream) if self._msg.metadata else 0

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        await self._msg.nak(delay=delay_s or None)

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    async def term(self) -> None:
        await self._msg.term()


class DirectLease:
    """A job message a one-shot command published, read by its stream sequence."""

    def __init__(self, js: JetStreamContext, sequence: int, subject: str, data: bytes) -> None:
        self._js = js
        self._sequence = sequence
        self.subject = subject
        self.data = data

    @classmethod
    async def read(cls, js: JetStreamContext, sequence: int) -> DirectLease | None:
        """The message at ``sequence``, or None when it is gone (taken by a dispatcher)."""
        try:
            raw = await js.get_msg(JOBS_STREAM, sequence)
        except Exception:  # noqa: BLE001 - deleted or acked meanwhile
            return None
        return cls(js, sequence, raw.subject or "", raw.data or b"")

    @property
    def deliveries(self) -> int:
        return 1

    @property
    def sequence(self) -> int:
        return self._sequence

    async def ack(self) -> None:
        with contextlib.suppress(Exception):  # gone already: someone else handled it
            await self._js.delete_msg(JOBS_STREAM, self._sequence)

    async def nak(self, delay_s: float = 0.0) -> None:
        """Nothing to hand back: the message stays in the queue for a dispatcher service."""

    async def in_progress(self) -> None:
        """Nothing to extend: this message is not leased from the consumer."""

    async def term(self) -> None:
        await self.ack()
