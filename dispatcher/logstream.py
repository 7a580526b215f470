"""Container output → ``log`` events, for ``ktrdr-run ops logs --follow``.

The engine's log stream is read on a worker thread and split into lines; lines are
published in batches at most every ``flush_s``, and past ``max_lines_per_s`` the excess
is counted and reported as one line, so a chatty op cannot flood NATS or the logs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator

from runner.protocol import POOL_READY_LINE, LogEvent, now

_LEVEL = re.compile(r"^\[(debug|info|warning|error|critical)\] ", re.IGNORECASE)
_END = object()


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Lines from a stream of byte chunks that may split or join lines."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


def to_event(op_id: str, line: str) -> LogEvent:
    """A log event from one line; the runner SDK's ``[level] message`` keeps its level."""
    match = _LEVEL.match(line)
    if match:
        return LogEvent(
            op_id=op_id,
            ts=now(),
            message=line[match.end() :],
            level=match.group(1).lower(),
            source="container",
        )
    return LogEvent(op_id=op_id, ts=now(), message=line, level="info", source="container")


async def stream_logs(
    read_chunks: Callable[[], Iterator[bytes]],
    run_blocking: Callable[[Callable[[], None]], Awaitable[None]],
    op_id: str,
    publish: Callable[[LogEvent], Awaitable[None]],
    *,
    flush_s: float = 0.25,
    max_lines_per_s: int = 200,
) -> None:
    """Follow a container's output until it ends, publishing log events.

    ``read_chunks`` opens the engine's (blocking) log stream; ``run_blocking`` runs a
    blocking callable off the event loop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in split_lines(read_chunks()):
                if line != POOL_READY_LINE:  # a warm container's, from before its op
                    loop.call_soon_threadsafe(queue.put_nowait, line)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    reader = asyncio.ensure_future(run_blocking(pump))
    # the reader thread ends when the container's output does; nobody waits for it
    reader.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    window_start, in_window, dropped = time.monotonic(), 0, 0
    try:
        done = False
        while not done:
            batch: list[str] = []
            item = await queue.get()
            deadline = time.monotonic() + flush_s
            while True:
                if item is _END:
                    done = True
                    break
                batch.append(str(item))
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    break
            for line in batch:
                if time.monotonic() - window_start >= 1.0:
                    if dropped:
                        notice = f"{dropped} log lines dropped (over {max_lines_per_s} lines/s)"
                        await publish(
                            LogEvent(
                                op_id=op_id, ts=now(), message=notice, level="warning", source="dispatcher"
                            )
                        )
                    window_start, in_window, dropped = time.monotonic(), 0, 0
                if in_window >= max_lines_per_s:
                    dropped += 1
                    continue
                in_window += 1
                await publish(to_event(op_id, line))
        if dropped:
            notice = f"{dropped} log lines dropped (over {max_lines_per_s} lines/s)"
            await publish(
                LogEvent(op_id=op_id, ts=now(), message=notice, level="warning", source="dispatcher")
            )
    finally:
        if not reader.done():
            reader.cancel()
