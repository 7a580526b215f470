"""The hosts panel: every host the dispatchers publish, with its free capacity."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable

from discovery.health import HostSnapshot
from tui.format import host_cells

#: (key, header, width) of each column; capacity columns read "free/total".
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("name", "HOST", 16),
    ("source", "SOURCE", 7),
    ("state", "STATE", 9),
    ("cpus", "CPUS", 9),
    ("memory", "MEMORY GiB", 11),
    ("gpus", "GPUS", 5),
    ("running", "OPS", 4),
)


class HostsPanel(DataTable[Any]):
    """One row per host: source, state, CPUs / memory / GPUs free of total, running ops."""

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="none", zebra_stripes=True, id=id, show_cursor=False)
        self.hosts: list[HostSnapshot] = []
        self.loaded = False

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, width=width, key=key)
        self.border_title = "hosts · CPUs, memory, GPUs: free/total · ops running"

    def show(self, hosts: list[HostSnapshot]) -> None:
        """Show a fresh read of the hosts snapshot (cells change in place; rows are
        added or removed only when hosts come or go)."""
        self.loaded = True
        names = [h.name for h in hosts]
        if names != [h.name for h in self.hosts]:
            self.clear()
            for host in hosts:
                self.add_row(*host_cells(host), key=host.name)
        else:
            for old, new in zip(self.hosts, hosts, strict=True):
                if old != new:
                    for (column, _, _), value in zip(COLUMNS, host_cells(new), strict=True):
                        self.update_cell(new.name, column, value)
        self.hosts = list(hosts)
        self.border_subtitle = f"{len(hosts)} host{'s' if len(hosts) != 1 else ''}"
