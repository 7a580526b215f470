"""The op detail screen: params, progress, metric sparklines, the event log (followed
live), the error and traceback of a failed op, and its artifacts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, ProgressBar, RichLog, Static

from ktrdr_run.charts import sparkline
from ktrdr_run.render import run_lines
from runner.protocol import (
    CancelAckEvent,
    CancelRequest,
    ErrorEvent,
    Event,
    HeartbeatEvent,
    LogEvent,
    OpRecord,
    ProgressEvent,
    ResultEvent,
    StatusEvent,
    TrialEvent,
)
from tui.format import (
    STATE_STYLES,
    duration,
    elapsed_s,
    metric_value,
    number,
    param_value,
    params_lines,
    percent_of,
    state_text,
    submitted_at,
)
from tui.messages import ConnectionChanged, OpEvent, RecordChanged
from tui.sweep_detail import SweepView

if TYPE_CHECKING:
    from tui.app import DashboardApp

log = logging.getLogger("ktrdr.tui")

SPARK_WIDTH = 48
TRACEBACK_LINES = 14
MAX_LOG_LINES = 5000
#: Metrics a sweep's trial line in the event log shows.
TRIAL_METRICS = ("final_equity", "sharpe_ratio", "total_trades")


def event_line(event: Event, t0: float) -> Text | None:
    """One line of the event log (None for heartbeats)."""
    if isinstance(event, HeartbeatEvent):
        return None
    line = Text()
    line.append(f"{'+' + format(event.ts - t0, '.1f'):>8}s ", style="dim")
    if isinstance(event, StatusEvent):
        line.append("status   ", style="bold")
        line.append(event.state, style=STATE_STYLES.get(event.state, ""))
        line.append(f"  {event.host}" if event.host else "")
        line.append(f"  {event.message}" if event.message else "")
    elif isinstance(event, ProgressEvent):
        line.append("progress ", style="bold")
        line.append(f"{event.percent:5.1f}%  {event.step}  {event.message}".rstrip())
        if event.metrics:
            line.append("  " + " ".join(f"{k}={number(v)}" for k, v in event.metrics.items()), style="cyan")
    elif isinstance(event, LogEvent):
        line.append("log      ", style="bold")
        style = {"warning": "yellow", "error": "red", "critical": "bold red"}.get(event.level, "")
        line.append(f"[{event.level}] {event.message}", style=style)
    elif isinstance(event, ResultEvent):
        line.append("result   ", style="bold green")
        line.append(f"{len(event.result)} fields, {len(event.artifacts)} artifact(s)")
    elif isinstance(event, ErrorEvent):
        line.append("error    ", style="bold red")
        line.append(f"{event.reason}: {event.message}", style="red")
    elif isinstance(event, CancelAckEvent):
        line.append("cancel_ack ", style="bold magenta")
        line.append(event.message or ("partial result saved" if event.partial_saved else "exiting"))
    elif isinstance(event, TrialEvent):
        line.append("trial    ", style="bold")
        line.append(f"#{event.index}  " + " ".join(f"{k}={param_value(v)}" for k, v in event.params.items()))
        if event.error is not None:
            line.append(f"  {event.error}", style="red")
        elif event.metrics:
            shown = " ".join(f"{k}={metric_value(k, event.metrics.get(k))}" for k in TRIAL_METRICS)
            line.append(f"  {shown}", style="cyan")
    elif isinstance(event, CancelRequest):
        line.append("cancel   ", style="bold magenta")
        reason = f": {event.reason}" if event.reason else ""
        line.append(f"requested by {event.requested_by or '?'}{reason}")
    return line


class OpDetailScreen(Screen[None]):
    """Everything about one op, live."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("c", "cancel_op", "Cancel op"),
        Binding("f", "toggle_follow", "Follow log"),
    ]

    def __init__(self, record: OpRecord, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.record = record
        self.op_id = record.op_id
        self.clock = clock
        self.follow = True
        self.history: dict[str, list[float]] = {}
        self.events_seen = 0
        self._t0 = submitted_at(record)

    @property
    def dashboard(self) -> DashboardApp:
        """The app, typed."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static("", id="detail-title")
        yield Static("", id="detail-summary")
        with Horizontal(id="detail-body"):
            with VerticalScroll(id="detail-left"):
                yield Static("", id="detail-params", classes="section")
                with Vertical(id="detail-progress", classes="section"):
                    yield ProgressBar(total=100, show_eta=False, id="progress-bar")
                    yield Static("", id="progress-step")
                yield Static("", id="detail-metrics", classes="section")
                yield Static("", id="detail-artifacts", classes="section")
            with Vertical(id="detail-right"):
                if self.record.kind == "sweep":
                    yield SweepView(id="detail-sweep")
                yield Static("", id="detail-error")
                yield RichLog(id="detail-log", max_lines=MAX_LOG_LINES, wrap=False, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#detail-params").border_title = "params"
        self.query_one("#detail-progress").border_title = "progress"
        self.query_one("#detail-metrics").border_title = "metrics"
        self.query_one("#detail-artifacts").border_title = "artifacts"
        self.query_one("#detail-error").border_title = "error"
        self._title_log()
        self.show_record(self.record)
        self.set_interval(1.0, self._tick)
        self.stream_events()

    # -- the record ------------------------------------------------------------------

    def show_record(self, record: OpRecord) -> None:
        """Show a (newer) record of the op."""
        self.record = record
        self._t0 = submitted_at(record) or self._t0
        title = Text(f" op {record.op_id}  ", style="bold")
        title.append_text(state_text(record.state))
        self.query_one("#detail-title", Static).update(title)
        self._summary()
        params = "\n".join(params_lines(record.params)) or "(none)"
        self.query_one("#detail-params", Static).update(Text(params))
        percent = percent_of(record)
        self.query_one(ProgressBar).update(progress=percent)
        step = record.progress
        words = f"{step.step}  {step.message}".strip() if step else "no progress reported yet"
        line = self.query_one("#progress-step", Static)
        line.update(Text(words, style="dim"))
        line.display = bool(words)
        self._metrics()
        artifacts = Text()
        for name, object_name in sorted(record.artifacts.items()):
            artifacts.append(name, style="bold")
            artifacts.append(f"\n  {object_name}\n")
        artifacts.rstrip()
        self.query_one("#detail-artifacts", Static).update(artifacts if record.artifacts else Text("(none)"))
        self._error()
        for sweep in self.query(SweepView):
            sweep.show_record(record)

    def _summary(self) -> None:
        record = self.record
        text = Text()
        for label, value in (
            ("kind", record.kind),
            ("host", record.host or "-"),
            ("attempts", str(record.attempts)),
            ("by", record.submitted_by or "-"),
            ("elapsed", duration(elapsed_s(record, self.clock()))),
        ):
            text.append(f"{label} ", style="dim")
            text.append(f"{value}   ")
        steps = sorted(record.timestamps.items(), key=lambda item: item[1])
        if steps:
            text.append("\n")
            text.append("  →  ".join(f"{state} +{ts - self._t0:.1f}s" for state, ts in steps), style="dim")
        if record.cancel is not None:
            cancel = record.cancel
            how = "forced" if cancel.forced else ("acknowledged" if cancel.acked else "requested")
            text.append(f"\ncancel {how} by {cancel.requested_by or '?'}", style="magenta")
            text.append(f": {cancel.reason}" if cancel.reason else "", style="magenta")
        for line in run_lines(record)[:-1]:  # earlier runs, before an operator requeued it
            text.append(f"\n{line}", style="dim")
        self.query_one("#detail-summary", Static).update(text)

    def _metrics(self) -> None:
        lines = Text()
        names = dict.fromkeys(self.history)
        last = self.record.progress.metrics if self.record.progress else {}
        names.update(dict.fromkeys(last))
        for name in names:
            values = self.history.get(name) or [last[name]]
            lines.append(f"{name}  ", style="bold")
            low, high = number(min(values)), number(max(values))
            lines.append(
                f"last {number(values[-1])}  min {low}  max {high}  ({len(values)} points)\n", style="dim"
            )
            lines.append(f"{sparkline(values, SPARK_WIDTH)}\n", style="cyan")
        lines.rstrip()
        self.query_one("#detail-metrics", Static).update(lines if names else Text("(none reported)"))

    def _error(self) -> None:
        panel = self.query_one("#detail-error", Static)
        error = self.record.error
        panel.display = error is not None
        if error is None:
            return
        text = Text()
        text.append(f"{error.reason}: ", style="bold red")
        text.append(error.message, style="red")
        if error.field:
            text.append(f"  (field {error.field})", style="red")
        tail = error.traceback.rstrip().splitlines()[-TRACEBACK_LINES:]
        if tail:
            text.append("\n" + "\n".join(tail), style="dim")
        panel.update(text)

    def _tick(self) -> None:
        if not self.record.terminal:
            self._summary()

    def _title_log(self) -> None:
        state = "follow on" if self.follow else "follow off"
        self.query_one(RichLog).border_title = f"events · {self.events_seen} · {state}"

    # -- the event stream ------------------------------------------------------------

    @work(exclusive=True, group="op-events", exit_on_error=False)
    async def stream_events(self) -> None:
        """Every event of the op from its start, then live ones (restarted on reconnect)."""
        self.post_message(OpEvent(None, restart=True))
        while True:
            try:
                async for event in self.dashboard.source.op(self.op_id).events(until_terminal=False):
                    self.post_message(OpEvent(event))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - shown, then retried
                log.warning("events of %s: %s", self.op_id, exc)
                await asyncio.sleep(1.0)
                self.post_message(OpEvent(None, restart=True))

    @on(OpEvent)
    def add_event(self, message: OpEvent) -> None:
        """Append an event to the log and its metrics to the sparklines."""
        view = self.query_one(RichLog)
        if message.restart:
            view.clear()
            self.history.clear()
            for sweep in self.query(SweepView):
                sweep.restart()
            self.events_seen = 0
            self._title_log()
            return
        event = message.event
        if event is None:
            return
        if isinstance(event, ProgressEvent) and event.metrics:
            for name, value in event.metrics.items():
                self.history.setdefault(name, []).append(value)
            self._metrics()
            for sweep in self.query(SweepView):
                sweep.add_progress(event.metrics)
        line = event_line(event, self._t0 or event.ts)
        if line is not None:
            self.events_seen += 1
            view.write(line, scroll_end=self.follow)
            self._title_log()

    @on(RecordChanged)
    def record_changed(self, message: RecordChanged) -> None:
        """A newer record from the watch."""
        self.show_record(message.record)

    @on(ConnectionChanged)
    def connection_changed(self, message: ConnectionChanged) -> None:
        """Back online: replay the op's events from its start (the stream is resynced)."""
        if message.connected:
            self.stream_events()

    # -- actions ---------------------------------------------------------------------

    def action_back(self) -> None:
        """Back to the ops table."""
        self.dismiss(None)

    def action_cancel_op(self) -> None:
        """Cancel this op (after a confirmation)."""
        self.dashboard.request_cancel(self.op_id)

    def action_toggle_follow(self) -> None:
        """Follow the event log (keep scrolled to the newest line) or not."""
        self.follow = not self.follow
        view = self.query_one(RichLog)
        view.auto_scroll = self.follow
        if self.follow:
            view.scroll_end(animate=False)
        self._title_log()
