"""Background tasks stop even when a cancel is swallowed on the way (dispatcher/aiotasks.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dispatcher.aiotasks import cancel_and_wait


async def test_a_task_that_swallowed_its_cancel_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def periodic() -> None:  # as a loop whose cancel was lost in a library's wait_for
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    async def failing() -> None:
        raise RuntimeError("it broke earlier")

    tasks = [asyncio.create_task(periodic()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(tasks), 5)
    assert swallowed == 1 and tasks[0].cancelled()
    assert isinstance(tasks[1].exception(), RuntimeError)


async def test_a_task_that_never_stops_is_named_after_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn-sweep")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="ktrdr.dispatcher"):
        await asyncio.wait_for(cancel_and_wait([task], deadline_s=1.0), 5)
    assert "1 background task(s) did not stop within 1s: stubborn-sweep" in caplog.text
    assert not task.done()
    released.set()  # leave nothing behind
    task.cancel()
    await asyncio.wait_for(task, 5)
