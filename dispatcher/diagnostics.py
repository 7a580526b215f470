"""What a dispatcher that seems stuck is doing, asked from outside without stopping it:
``kill -USR1 PID`` logs the stack of every asyncio task, ``kill -USR2 PID`` writes every
thread's stack to standard error (that one works even while the event loop is blocked)."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
import sys

log = logging.getLogger("ktrdr.dispatcher")


def log_tasks() -> None:
    """Log every asyncio task of the running loop with its current stack."""
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    for task in tasks:
        task.print_stack(limit=10, file=out)
    log.warning("%d asyncio tasks:\n%s", len(tasks), out.getvalue())


def install(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR1: the tasks (logged); SIGUSR2: the threads (stderr)."""
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
