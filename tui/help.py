"""The help screen: every key of the dashboard."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

#: (keys, what they do), in the order shown.
KEYS: tuple[tuple[str, str], ...] = (
    ("↑ ↓  j k", "move between ops"),
    ("Enter", "open the op: params, progress, metrics, events, error, artifacts"),
    ("c", "cancel the selected op (asks first; off with --read-only)"),
    ("/", "filter by text (id, kind, host, submitter, state); Enter keeps it, Esc clears"),
    ("f", "cycle the state filter: all, active, queued, running, completed, failed, cancelled"),
    ("s  S", "cycle the sort column / reverse the order (or click a header)"),
    ("h", "show or hide the hosts panel"),
    ("Esc", "clear the filters; in an op: back to the table"),
    ("f  (in an op)", "follow the event log on / off"),
    ("?", "this help"),
    ("q", "quit"),
)


class HelpScreen(ModalScreen[None]):
    """Lists the keys; any of Esc, q, ? closes it."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for keys, what in KEYS:
            table.add_row(keys, what)
        with Vertical(id="help-box"):
            yield Static("[b]ktrdr-run dashboard — keys[/b]", id="help-title")
            yield Static(table)
            yield Static("[dim]Esc, q or ? closes this help[/dim]", id="help-close")

    def action_close(self) -> None:
        """Back to where the help was opened."""
        self.dismiss(None)
