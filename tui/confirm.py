"""The confirmation asked before an op is cancelled."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label

from runner.protocol import OpRecord


class ConfirmCancel(ModalScreen[bool]):
    """Asks whether to cancel one op: ``y`` confirms, ``n`` or Esc aborts."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes, cancel it"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.record = record

    def compose(self) -> ComposeResult:
        record = self.record
        with Vertical(id="confirm-box"):
            yield Label(f"Cancel op [b]{record.op_id}[/b]?", id="confirm-question")
            yield Label(f"{record.kind} · {record.state} · {record.host or 'no host yet'}")
            yield Label("[b]y[/b] cancel it    [b]n[/b] / [b]Esc[/b] keep it running", id="confirm-keys")

    def action_answer(self, yes: bool) -> None:
        """Close with the answer."""
        self.dismiss(yes)
