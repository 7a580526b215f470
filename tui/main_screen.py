"""The main screen: the ops table, the hosts panel, the filter line and the status line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from tui.hosts import HostsPanel
from tui.ops_table import SORTS, STATE_FILTERS, OpsTable

if TYPE_CHECKING:
    from tui.app import DashboardApp


class FilterInput(Input):
    """The text filter: narrows the table as it is typed; Enter keeps it, Esc clears it."""

    BINDINGS = [Binding("escape", "clear", "Clear filter")]

    def action_clear(self) -> None:
        """Empty the filter and go back to the table."""
        self.value = ""
        self.post_message(self.Submitted(self, ""))


class OpsScreen(Screen[None]):
    """Every op, live; the hosts below them."""

    BINDINGS = [
        Binding("c", "cancel_op", "Cancel op"),
        Binding("slash", "filter", "Filter"),
        Binding("f", "cycle_state", "State filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse", show=False),
        Binding("h", "toggle_hosts", "Hosts"),
        Binding("escape", "clear_filters", "Clear filters", show=False),
    ]

    def __init__(self, *, clock: Callable[[], float] = time.time, read_only: bool = False) -> None:
        super().__init__()
        self.clock = clock
        self.read_only = read_only

    @property
    def dashboard(self) -> DashboardApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Horizontal(id="topbar"):
            yield Static("ktrdr-run dashboard", id="title")
            yield Static("", id="connection")
        yield OpsTable(clock=self.clock, id="ops")
        yield HostsPanel(id="hosts")
        yield Static("", id="summary")
        yield FilterInput(placeholder="filter: id, kind, host, submitter or state", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(OpsTable).focus()
        self.show_connection(self.dashboard.connected)

    # -- shown state -----------------------------------------------------------------

    def show_connection(self, connected: bool) -> None:
        """Say whether NATS is connected (and where)."""
        where = self.dashboard.server
        label = self.query_one("#connection", Static)
        if connected:
            label.update(f"[green]● connected[/green] {where}".rstrip())
        else:
            label.update(f"[b white on red] ✖ disconnected [/] reconnecting to {where}".rstrip())
        label.set_class(not connected, "down")

    @on(OpsTable.ViewChanged)
    def show_view(self, event: OpsTable.ViewChanged) -> None:
        """Sum up what the table shows."""
        arrow = "▼" if event.reverse else "▲"
        parts = [
            f"[b]{event.shown}[/b] of {event.total} ops · {event.running} running",
            f"state [b]{event.state_filter}[/b]",
            f"filter [b]{escape(event.text_filter)}[/b]" if event.text_filter else "filter —",
            f"sort [b]{event.sort} {arrow}[/b]",
        ]
        if self.read_only:
            parts.append("[b yellow]read-only[/b yellow]")
        self.query_one("#summary", Static).update(" │ ".join(parts))

    # -- actions ---------------------------------------------------------------------

    def action_cancel_op(self) -> None:
        """Cancel the op under the cursor (after a confirmation)."""
        op_id = self.query_one(OpsTable).selected_op_id
        if op_id is None:
            self.notify("no op selected", severity="warning")
            return
        self.dashboard.request_cancel(op_id)

    def action_filter(self) -> None:
        """Open the text filter."""
        field = self.query_one(FilterInput)
        field.display = True
        field.focus()

    def action_cycle_state(self) -> None:
        """Next state filter: all → active → queued → … → cancelled → all."""
        table = self.query_one(OpsTable)
        following = STATE_FILTERS[(STATE_FILTERS.index(table.state_filter) + 1) % len(STATE_FILTERS)]
        table.set_filters(state=following)

    def action_cycle_sort(self) -> None:
        """Sort by the next column."""
        table = self.query_one(OpsTable)
        table.set_sort(SORTS[(SORTS.index(table.sort_by) + 1) % len(SORTS)])

    def action_reverse_sort(self) -> None:
        """Reverse the order."""
        table = self.query_one(OpsTable)
        table.set_sort(table.sort_by, reverse=not table.reverse)

    def action_toggle_hosts(self) -> None:
        """Show or hide the hosts panel."""
        panel = self.query_one(HostsPanel)
        panel.display = not panel.display

    def action_clear_filters(self) -> None:
        """Drop the text and state filters."""
        field = self.query_one(FilterInput)
        field.value = ""
        field.display = False
        self.query_one(OpsTable).set_filters(text="", state="all")

    # -- events ----------------------------------------------------------------------

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        """Narrow the table as the filter is typed."""
        self.query_one(OpsTable).set_filters(text=event.value)

    @on(Input.Submitted, "#filter")
    def filter_done(self, event: Input.Submitted) -> None:
        """Back to the table; the filter line stays while it filters."""
        table = self.query_one(OpsTable)
        if event.value != table.text_filter:
            table.set_filters(text=event.value)
        self.query_one(FilterInput).display = bool(event.value)
        table.focus()

    @on(OpsTable.OpChosen)
    def open_op(self, event: OpsTable.OpChosen) -> None:
        """Open the chosen op's detail."""
        self.dashboard.open_detail(event.op_id)
