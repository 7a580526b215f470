"""Reading a KV bucket's current values without trusting nats-py's "done" marker.

nats-py's watcher says "no more current values" (a ``None``) by comparing the consumer's
pending count with what the client has processed so far, so the marker can come before
values the server has already pushed (a listing of 1,000 keys came back empty), and
``kv.keys()`` inherits that. Here the current values end by the server's word instead: the
message delivered with nothing pending after it (deletes are read too, since the last
current value may be one). The marker only ends the wait once nothing more arrives for
``SETTLE_S`` (an empty bucket, or values that expired meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

#: How long to wait for more current values after nats-py says there are none.
SETTLE_S = 0.5


async def watch_entries(kv: Any) -> AsyncGenerator[list[Any], None]:
    """Batches of live entries (values, not deletes): every current one first (one
    batch, maybe empty), then each entry as it is written."""
    watcher = await kv.watchall()
    updates = aiter(watcher)
    batch: list[Any] = []
    initial, marker_seen = True, False
    try:
        while True:
            try:
                async with asyncio.timeout(SETTLE_S if initial and marker_seen else None):
                    entry = await anext(updates)
            except TimeoutError:  # the marker was right: nothing more is current
                initial = False
                yield batch
                continue
            if entry is None:
                marker_seen = True
                continue
            live = bool(entry.value) and entry.operation is None
            if not initial:
                if live:
                    yield [entry]
                continue
            if live:
                batch.append(entry)
            if entry.delta == 0:  # the last current value
                initial = False
                yield batch
    finally:
        await watcher.stop()


async def current_entries(kv: Any) -> list[Any]:
    """Every current live entry of the bucket (one pass)."""
    batches = watch_entries(kv)
    try:
        return await anext(batches)
    finally:
        await batches.aclose()
