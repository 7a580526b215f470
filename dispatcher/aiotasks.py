"""Stopping background tasks, with a deadline.

One ``cancel()`` is not always enough: a cancellation that arrives just as an awaited
operation completes can be swallowed on its way up (``asyncio.wait_for`` in Python 3.11
does this, and libraries use it), and the task then runs on as if nothing happened. A
dispatcher's periodic sweep did exactly that at shutdown once in about ten stops, and the
process never exited. So the cancel is repeated until each task has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("ktrdr.dispatcher")

#: How often a cancel is repeated for a task that has not ended.
RECANCEL_EVERY_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], deadline_s: float = 30.0) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each
    ``RECANCEL_EVERY_S`` those still running; after ``deadline_s`` give up on the rest
    (logged, named)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    said: set[asyncio.Task[Any]] = set()
    give_up = time.monotonic() + deadline_s
    while pending:
        for task in pending:
            task.cancel()
        left = give_up - time.monotonic()
        if left <= 0:
            names = ", ".join(sorted(task.get_name() for task in pending))
            log.warning("%d background task(s) did not stop within %gs: %s", len(pending), deadline_s, names)
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY_S, left))
        for task in pending - said:
            log.info("background task %s runs on after a cancel; cancelling it again", task.get_name())
        said |= pending
    for task in tasks:  # what they raised was theirs to log; retrieved, so asyncio says nothing
        if task.done() and not task.cancelled():
            task.exception()
