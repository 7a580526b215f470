"""Which dispatchers are alive: a lease per dispatcher in KV ``ktrdr_dispatchers``.

Each dispatcher puts its key (its id) every ``lease_s / 3`` with a per-message TTL of
``lease_s``: the NATS server's own clock expires the key of a dispatcher that stopped
renewing it (killed, frozen, cut off), and any other dispatcher may then take its ops
over. A dispatcher that was frozen longer than its lease must assume it lost its ops:
on such a gap it re-checks every op it runs before touching it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dispatcher.kvwatch import current_entries
from dispatcher.opstore import TRANSIENT_ERRORS, retrying
from runner.protocol import DISPATCHERS_BUCKET, JOBS_STREAM, DispatcherInfo, encode

log = logging.getLogger("ktrdr.liveness")


async def deployment_id(js: JetStreamContext) -> str:
    """A stable id of this deployment: a digest of when its job stream was created."""
    info = await retrying(lambda: js.stream_info(JOBS_STREAM), what="read the job stream")
    created = info.created.isoformat() if info.created else ""
    return hashlib.sha256(f"{JOBS_STREAM}@{created}".encode()).hexdigest()[:16]


async def live_dispatchers(kv: KeyValue) -> set[str]:
    """Ids of the dispatchers whose lease has not expired (read to the server's end of
    the current values: a short list here would let a sweep take over live peers' ops)."""
    entries = await retrying(lambda: current_entries(kv), what="list dispatcher leases", deadline_s=30.0)
    return {entry.key for entry in entries}


class DispatcherLease:
    """This dispatcher's lease: renewed while :meth:`run` runs, deleted on :meth:`release`."""

    def __init__(
        self, js: JetStreamContext, kv: KeyValue, info: Callable[[], DispatcherInfo], *, lease_s: float
    ) -> None:
        self.js = js
        self.kv = kv
        self.info = info
        self.lease_s = lease_s
        self._renewed_at = 0.0  # time.monotonic() of the last successful renewal
        self._stable_since = 0.0  # since when renewals have come without a gap

    @property
    def dispatcher_id(self) -> str:
        """The key of this lease."""
        return self.info().dispatcher_id

    @property
    def stable(self) -> bool:
        """Whether the lease has been renewed without a gap for a whole lease period, so
        other dispatchers have had time to renew theirs after an outage too."""
        now_s = time.monotonic()
        return (
            bool(self._stable_since)
            and now_s - self._stable_since >= self.lease_s
            and (now_s - self._renewed_at < self.lease_s / 2)
        )

    async def renew(self) -> bool:
        """Put the key once; True when it was renewed."""
        info = self.info()
        try:
            # a KV put with a per-message TTL, on the bucket's own subject ($KV.<bucket>.<key>)
            await self.js.publish(
                f"$KV.{DISPATCHERS_BUCKET}.{info.dispatcher_id}", encode(info), msg_ttl=self.lease_s
            )
        except TRANSIENT_ERRORS as exc:
            log.info("dispatcher %s: lease not renewed (%s)", info.dispatcher_id, type(exc).__name__)
            return False
        now_s = time.monotonic()
        if not self._renewed_at or now_s - self._renewed_at >= self.lease_s:
            self._stable_since = now_s
        self._renewed_at = now_s
        return True

    async def run(self, on_gap: Callable[[], Awaitable[None]]) -> None:
        """Renew every ``lease_s / 3``; call ``on_gap`` after any gap longer than the
        lease (a freeze, a long outage): others may have taken our ops over meanwhile."""
        while True:
            before = self._renewed_at
            if await self.renew() and before and self._renewed_at - before >= self.lease_s:
                log.warning(
                    "dispatcher %s: lease lapsed for %.1fs; re-checking the ops it runs",
                    self.dispatcher_id,
                    self._renewed_at - before,
                )
                await on_gap()
            await asyncio.sleep(self.lease_s / 3)

    async def release(self) -> None:
        """Delete the key (a clean stop): nobody needs to wait for it to expire."""
        try:
            await self.kv.delete(self.dispatcher_id)
        except KeyNotFoundError:
            pass
        except TRANSIENT_ERRORS:
            pass
