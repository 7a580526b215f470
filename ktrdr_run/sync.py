"""A blocking wrapper around :class:`ktrdr_run.Client` for notebooks and scripts.

The async client runs on an event loop in a background thread, so this works where a
loop already runs (Jupyter) as well as in plain scripts::

    with SyncClient() as client:
        op = client.submit("backtest", {"strategy": "sma_cross", "symbol": "DEMO"})
        for event in op.events():
            print(event)
        record = op.wait()
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

from discovery.health import HostSnapshot
from ktrdr_run.client import Client, Op
from runner.protocol import Event, OpRecord

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ktrdr-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator, one blocking step at a time."""
        try:
            while True:
                try:
                    yield self.run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(agen, "aclose", None)
            if close is not None and self.loop.is_running():
                self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class SyncOp:
    """The blocking form of :class:`ktrdr_run.client.Op`."""

    def __init__(self, op: Op, runner: _LoopThread) -> None:
        self._op = op
        self._runner = runner
        self.op_id = op.op_id

    def __repr__(self) -> str:
        return f"SyncOp({self.op_id!r})"

    def record(self) -> OpRecord:
        """The op's record now."""
        return self._runner.run(self._op.record())

    def events(self, *, until_terminal: bool = True) -> Iterator[Event]:
        """The op's events from its start, then live ones."""
        return self._runner.iterate(self._op.events(until_terminal=until_terminal))

    def wait(self, timeout_s: float | None = None) -> OpRecord:
        """Block until the op's terminal state; see Op.wait."""
        return self._runner.run(self._op.wait(timeout_s))

    def cancel(self, reason: str = "") -> OpRecord | None:
        """Ask the op to cancel."""
        return self._runner.run(self._op.cancel(reason))

    def artifact(self, name: str) -> bytes:
        """One of the op's artifacts by its name in the op."""
        return self._runner.run(self._op.artifact(name))

    def save_artifacts(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the op's artifacts into ``directory``."""
        return self._runner.run(self._op.save_artifacts(directory))


class SyncClient:
    """The blocking form of :class:`ktrdr_run.Client`; takes the same arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runner = _LoopThread()
        try:
            self._client = Client(*args, **kwargs)
            self._runner.run(self._client.connect())
        except BaseException:
            self._runner.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the background loop."""
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.stop()

    def submit(self, kind: str, params: dict[str, Any] | None = None, **options: Any) -> SyncOp:
        """Submit an op; see Client.submit."""
        return SyncOp(self._runner.run(self._client.submit(kind, params, **options)), self._runner)

    def op(self, op_id: str) -> SyncOp:
        """A handle on an existing op."""
        return SyncOp(self._client.op(op_id), self._runner)

    def requeue(self, op_id: str, reason: str = "") -> SyncOp:
        """Run an ended op again as its next attempt; see Client.requeue."""
        return SyncOp(self._runner.run(self._client.requeue(op_id, reason)), self._runner)

    def ops(
        self, *, state: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[OpRecord]:
        """Op records, newest first."""
        return self._runner.run(self._client.ops(state=state, kind=kind, limit=limit))

    def watch_ops(self) -> Iterator[list[OpRecord]]:
        """Batches of op records: every current one, then each change."""
        return self._runner.iterate(self._client.watch_ops())

    def hosts(self) -> list[HostSnapshot]:
        """The hosts and their free capacity."""
        return self._runner.run(self._client.hosts())

    def artifact(self, name: str) -> bytes:
        """An artifact's verified bytes by its store name."""
        return self._runner.run(self._client.artifact(name))

    def save_artifacts(self, op_id: str, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write each artifact of ``op_id`` into ``directory``."""
        return self._runner.run(self._client.save_artifacts(op_id, directory))
