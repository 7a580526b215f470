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
import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import nats.errors
from nats.js import api

#: How long to wait for more current values after nats-py says there are none.
SETTLE_S = 0.5
#: Values per batch of :func:`scan_values`: what a scan holds in memory at a time.
SCAN_BATCH = 256


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


async def scan_values(js: Any, kv: Any, batch: int = SCAN_BATCH) -> AsyncGenerator[list[Any], None]:
    """The bucket's current live values (raw messages; deletes skipped), ``batch`` at a
    time, until the server has none left to send (as with a watch, a value written while
    the scan runs may come too, and a key may then come twice).

    A watch (:func:`watch_entries`) is a push consumer: the server sends every value at
    once and the client buffers them all, so reading a bucket of N values holds memory for
    N. Here an ephemeral pull consumer is asked for one batch at a time: memory holds one
    batch, however many keys the bucket has.
    """
    stream, prefix = kv._stream, kv._pre
    name = f"scan-{uuid.uuid4().hex}"
    info = await js.add_consumer(
        stream,
        api.ConsumerConfig(
            name=name,
            filter_subject=f"{prefix}>",
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,  # a scan cut short leaves nothing behind for long
            mem_storage=True,
        ),
    )
    try:
        if not info.num_pending:
            return
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=5.0)
                except nats.errors.TimeoutError:
                    if not (await js.consumer_info(stream, name)).num_pending:
                        return  # what was left expired meanwhile
                    continue
                yield [msg for msg in msgs if msg.data and not (msg.headers or {}).get("KV-Operation")]
                if not msgs or msgs[-1].metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
