"""The ops table: one row per op record, fed by the KV watch.

Rows are keyed by op id and updated cell by cell; the table is rebuilt only when the set
of shown rows changes wholesale (the first batch, a resync, a new filter). Sorting is by
the records themselves (not the rendered cells) and is deferred and coalesced, so a
stream of progress updates costs a few cell updates each.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.message import Message
from textual.timer import Timer
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from ktrdr_run.headline import headline_metric, metric_text
from runner.protocol import TERMINAL_STATES, OpRecord
from tui.format import (
    STATE_ORDER,
    duration,
    elapsed_s,
    percent_of,
    progress_text,
    state_text,
    submitted_at,
)

#: (key, header, width) of each column.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("id", "ID", 26),
    ("kind", "KIND", 10),
    ("state", "STATE", 10),
    ("progress", "PROGRESS", 15),
    ("elapsed", "ELAPSED", 8),
    ("host", "HOST", 16),
    ("metric", "METRIC", 16),
    ("submitter", "SUBMITTER", 20),
)
#: What ``s`` cycles through; "submitted" (newest first) is the default.
SORTS: tuple[str, ...] = ("submitted", *(key for key, _, _ in COLUMNS))
#: What ``f`` cycles through; "active" is every state that is not terminal.
STATE_FILTERS: tuple[str, ...] = ("all", "active", "queued", "running", "completed", "failed", "cancelled")
#: Sorts whose first direction is descending (biggest / newest first).
DESCENDING_FIRST = frozenset({"submitted", "progress", "elapsed", "metric"})
RESORT_DELAY_S = 0.2


def _sort_value(record: OpRecord, sort: str, now: float) -> Any:
    """The value of ``record`` that ``sort`` orders by (None: has none, sorts last)."""
    if sort == "submitted":
        return submitted_at(record)
    if sort == "id":
        return record.op_id
    if sort == "kind":
        return record.kind
    if sort == "state":
        return STATE_ORDER.get(record.state, len(STATE_ORDER))
    if sort == "progress":
        return percent_of(record)
    if sort == "elapsed":
        return elapsed_s(record, now)
    if sort == "host":
        return record.host or None
    if sort == "metric":
        found = headline_metric(record)
        return None if found is None else found[1]
    if sort == "submitter":
        return record.submitted_by or None
    raise ValueError(f"unknown sort {sort!r}")


class OpsTable(DataTable[Any]):
    """Every op (matching the filters) with its state, progress and headline metric."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    class ViewChanged(Message):
        """What the table shows changed: rows shown of the total, filters, sort."""

        def __init__(self, table: OpsTable) -> None:
            super().__init__()
            self.shown = table.row_count
            self.total = len(table.records)
            self.running = sum(1 for r in table.records.values() if r.state == "running")
            self.text_filter = table.text_filter
            self.state_filter = table.state_filter
            self.sort = table.sort_by
            self.reverse = table.reverse

    class OpChosen(Message):
        """The user chose an op (Enter on its row)."""

        def __init__(self, op_id: str) -> None:
            super().__init__()
            self.op_id = op_id

    def __init__(self, *, clock: Callable[[], float] = time.time, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        self.clock = clock
        self.records: dict[str, OpRecord] = {}
        self.text_filter = ""
        self.state_filter = "all"
        self.sort_by = "submitted"
        self.reverse = True
        self._shown: set[str] = set()
        self._resort_timer: Timer | None = None

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, width=width, key=key)
        self._label_columns()
        self.set_interval(1.0, self._tick)

    # -- reading ---------------------------------------------------------------------

    @property
    def selected_op_id(self) -> str | None:
        """The op under the cursor, if any."""
        if self.row_count == 0:
            return None
        row = min(self.cursor_row, self.row_count - 1)
        return str(self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value)

    @property
    def shown_ids(self) -> list[str]:
        """The op ids of the rows, top to bottom."""
        rows = range(self.row_count)
        return [str(self.coordinate_to_cell_key(Coordinate(i, 0)).row_key.value) for i in rows]

    def matches(self, record: OpRecord) -> bool:
        """Whether ``record`` passes the state filter and the text filter."""
        state = self.state_filter
        if state == "active":
            if record.state in TERMINAL_STATES:
                return False
        elif state != "all" and record.state != state:
            return False
        needle = self.text_filter.lower()
        if not needle:
            return True
        haystack = (record.op_id, record.kind, record.host, record.submitted_by, record.state)
        return any(needle in field.lower() for field in haystack)

    # -- feeding ---------------------------------------------------------------------

    def apply(self, records: list[OpRecord], *, initial: bool) -> None:
        """Take a batch from the watch: ``initial`` replaces everything (first load or a
        resync after a reconnect), otherwise each record is updated in place."""
        if initial:
            self.records = {record.op_id: record for record in records}
            self._rebuild()
        else:
            resort = False
            for record in records:
                resort = self._upsert(record) or resort
            if resort:
                self._schedule_resort()
        self.post_message(self.ViewChanged(self))

    def set_filters(self, *, text: str | None = None, state: str | None = None) -> None:
        """Change the text and/or state filter and show what matches."""
        if text is not None:
            self.text_filter = text
        if state is not None:
            self.state_filter = state
        self._rebuild()
        self.post_message(self.ViewChanged(self))

    def set_sort(self, sort: str, reverse: bool | None = None) -> None:
        """Order rows by ``sort`` (descending when ``reverse``; by default, the sort's
        natural first direction)."""
        self.sort_by = sort
        self.reverse = (sort in DESCENDING_FIRST) if reverse is None else reverse
        self._label_columns()
        self._resort()
        self.post_message(self.ViewChanged(self))

    # -- internals -------------------------------------------------------------------

    def _cells(self, record: OpRecord, now: float) -> tuple[Any, ...]:
        # Text everywhere: no markup parsing (an id or a host is never read as markup)
        return (
            Text(record.op_id),
            Text(record.kind),
            state_text(record.state),
            progress_text(percent_of(record)),
            Text(duration(elapsed_s(record, now)), justify="right"),
            Text(record.host or "-"),
            Text(metric_text(record)),
            Text(record.submitted_by),
        )

    def _key(self, record: OpRecord, now: float) -> tuple[Any, ...]:
        value = _sort_value(record, self.sort_by, now)
        present = value is not None
        # missing values last in either direction; the op id breaks ties
        return (present if self.reverse else not present, value if present else 0, record.op_id)

    def _rebuild(self) -> None:
        selected = self.selected_op_id
        now = self.clock()
        rows = sorted(
            (r for r in self.records.values() if self.matches(r)),
            key=lambda r: self._key(r, now),
            reverse=self.reverse,
        )
        self.clear()
        self._shown = set()
        # thousands of small objects at once: no collector passes in the middle (they
        # made the load of 1,000 rows take up to 6x longer now and then)
        collecting = gc.isenabled()
        gc.disable()
        try:
            for record in rows:
                self.add_row(*self._cells(record, now), key=record.op_id)
                self._shown.add(record.op_id)
        finally:
            if collecting:
                gc.enable()
        self._restore_cursor(selected)

    def _upsert(self, record: OpRecord) -> bool:
        """Show ``record``'s change; True when the order may have changed."""
        op_id = record.op_id
        old = self.records.get(op_id)
        self.records[op_id] = record
        shown = op_id in self._shown
        if not self.matches(record):
            if shown:
                selected = self.selected_op_id
                self.remove_row(op_id)
                self._shown.discard(op_id)
                self._restore_cursor(selected)
            return False
        now = self.clock()
        cells = self._cells(record, now)
        if not shown:
            self.add_row(*cells, key=op_id)
            self._shown.add(op_id)
            return True
        current = self.get_row(op_id)
        for (column, _, _), value, before in zip(COLUMNS, cells, current, strict=True):
            if value != before:
                self.update_cell(op_id, column, value)
        return old is None or self._key(old, now) != self._key(record, now)

    def _schedule_resort(self) -> None:
        if self._resort_timer is None:
            self._resort_timer = self.set_timer(RESORT_DELAY_S, self._resort)

    def _resort(self) -> None:
        self._resort_timer = None
        selected = self.selected_op_id
        now = self.clock()
        records = self.records
        self.sort("id", key=lambda op_id: self._key(records[op_id.plain], now), reverse=self.reverse)
        self._restore_cursor(selected)

    def _restore_cursor(self, op_id: str | None) -> None:
        if op_id is not None and op_id in self._shown:
            row = self.get_row_index(op_id)
            if row != self.cursor_row:
                self.move_cursor(row=row, animate=False)

    def _label_columns(self) -> None:
        arrow = " ▼" if self.reverse else " ▲"
        for key, label, _ in COLUMNS:
            self.columns[ColumnKey(key)].label = Text(label + (arrow if key == self.sort_by else ""))

    def _tick(self) -> None:
        """Advance the elapsed time of every op that is still going."""
        now = self.clock()
        for op_id in self._shown:
            record = self.records[op_id]
            if record.state not in TERMINAL_STATES and record.timestamps:
                value = Text(duration(elapsed_s(record, now)), justify="right")
                if value != self.get_cell(op_id, "elapsed"):
                    self.update_cell(op_id, "elapsed", value)
        if self.sort_by == "elapsed":
            self._schedule_resort()

    # -- events ----------------------------------------------------------------------

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a header sorts by that column (again: the other way round)."""
        event.stop()
        key = str(event.column_key.value)
        self.set_sort(key, reverse=not self.reverse if key == self.sort_by else None)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row opens that op."""
        event.stop()
        self.post_message(self.OpChosen(str(event.row_key.value)))
