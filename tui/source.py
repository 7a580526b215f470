"""What the dashboard reads from and publishes to: the client API, as a protocol.

:class:`ktrdr_run.Client` satisfies it; tests may hand the app any object with the same
methods (fixed records and hosts, for snapshots). The dashboard never talks to Docker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from discovery.health import HostSnapshot
from runner.protocol import Event, OpRecord


class OpHandle(Protocol):
    """One op's event stream (what ``Client.op(op_id)`` returns)."""

    def events(self, *, until_terminal: bool = True) -> AsyncIterator[Event]:
        """Every event of the op from its start, then live ones."""
        ...


class DashboardSource(Protocol):
    """The part of :class:`ktrdr_run.Client` the dashboard uses."""

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now."""
        ...

    def watch_ops(self) -> AsyncIterator[list[OpRecord]]:
        """Batches of op records: every current one first, then each change."""
        ...

    def op(self, op_id: str) -> OpHandle:
        """A handle on one op."""
        ...

    async def hosts(self) -> list[HostSnapshot]:
        """The hosts and their free capacity."""
        ...

    async def record(self, op_id: str) -> OpRecord:
        """One op's record now."""
        ...

    async def cancel(self, op_id: str, reason: str = "") -> OpRecord | None:
        """Publish a cancel request for the op."""
        ...
