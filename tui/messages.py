"""Messages the dashboard's workers and widgets post to each other."""

from __future__ import annotations

from textual.message import Message

from discovery.health import HostSnapshot
from runner.protocol import Event, OpRecord


class OpsBatch(Message):
    """Op records from the KV watch: ``initial`` is the full set (it replaces the
    table's contents: a resync), otherwise the records that changed."""

    def __init__(self, records: list[OpRecord], *, initial: bool) -> None:
        super().__init__()
        self.records = records
        self.initial = initial


class RecordChanged(Message):
    """A newer record of the op a detail screen shows."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.record = record


class OpEvent(Message):
    """One event of the op a detail screen shows (``replay``: the screen restarts its
    stream, so it clears what it showed)."""

    def __init__(self, event: Event | None, *, restart: bool = False) -> None:
        super().__init__()
        self.event = event
        self.restart = restart


class HostsUpdated(Message):
    """A fresh read of the hosts snapshot."""

    def __init__(self, hosts: list[HostSnapshot]) -> None:
        super().__init__()
        self.hosts = hosts


class ConnectionChanged(Message):
    """The NATS connection went down or came back."""

    def __init__(self, connected: bool) -> None:
        super().__init__()
        self.connected = connected
