"""How the CLI shows ops: rich tables, colours and a live progress bar on a terminal;
plain lines everywhere else (pipes, CI, log files).

Whether a stream is a terminal decides, per stream: ``ktrdr-run backtest ... > out.txt``
still draws its progress bar on the terminal's stderr and writes plain text to the file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ktrdr_run.headline import metric_text
from runner.protocol import OpRecord, ProgressEvent, StatusEvent

STATE_STYLES = {
    "queued": "yellow",
    "placing": "yellow",
    "starting": "cyan",
    "running": "bold cyan",
    "completed": "bold green",
    "failed": "bold red",
    "timed_out": "red",
    "cancelled": "magenta",
    "lost": "red",
}


def console_for(stream: TextIO) -> Console:
    """A rich console on ``stream``; colours and boxes only when it is a terminal."""
    return Console(file=stream, highlight=False, soft_wrap=False)


def state_text(state: str) -> Text:
    """An op state, coloured."""
    return Text(state, style=STATE_STYLES.get(state, ""))


def render_value(value: Any) -> str:
    """A result value as one short string."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def submitted_at(record: OpRecord) -> float:
    """When the op was first seen (its earliest timestamp)."""
    return min(record.timestamps.values(), default=0.0)


def duration_s(record: OpRecord, now_s: float | None = None) -> float | None:
    """Seconds from queued to the terminal state (or to now while it runs)."""
    start = record.timestamps.get("queued") or (submitted_at(record) or None)
    if start is None:
        return None
    end = max(record.timestamps.values()) if record.terminal else (now_s or time.time())
    return max(0.0, end - start)


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``3m05s``, ``2h04m``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


# --- progress while following an op ----------------------------------------------------------


class ProgressView:
    """Follows one op: a live rich progress bar (step, percent, metrics) on a terminal,
    a line per step and per state change elsewhere."""

    def __init__(
        self, stream: TextIO, op_id: str, milestone: Callable[[ProgressEvent], str | None] | None = None
    ) -> None:
        self.stream = stream
        self.op_id = op_id
        #: Turns a milestone (an epoch's end) into a line printed for good; None: none.
        self.milestone = milestone
        self.console = console_for(stream)
        self.tty = self.console.is_terminal
        self._last_step = ""
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressView:
        if self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[op]}"),
                TextColumn("{task.fields[state]}"),
                BarColumn(bar_width=30),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[step]} {task.fields[metrics]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "op", total=100, op=self.op_id, state="queued", step="", metrics=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def status(self, event: StatusEvent) -> None:
        """A state change: the bar's state field, and a printed line."""
        where = f" on {event.host}" if event.host else ""
        extra = f" ({event.message})" if event.message else ""
        if self._progress is not None and self._task is not None:
            style = STATE_STYLES.get(event.state, "")
            self._progress.update(self._task, state=f"[{style}]{event.state}[/]" if style else event.state)
            self.console.print(Text.assemble(f"{self.op_id}: ", state_text(event.state), f"{where}{extra}"))
        else:
            print(f"{self.op_id}: {event.state}{where}{extra}", file=self.stream, flush=True)

    def progress(self, event: ProgressEvent) -> None:
        """Progress: move the bar; without a terminal, a line when the step changes.
        A milestone gets its own line either way."""
        line = self.milestone(event) if self.milestone is not None else None
        if line:
            self.line(line)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:4])
        if self._progress is not None and self._task is not None:
            step = event.step or event.message
            self._progress.update(self._task, completed=event.percent, step=step[:30], metrics=metrics)
        elif not line and (event.step != self._last_step or event.percent >= 100):
            text = f"{event.message} {metrics}".strip()
            print(f"{self.op_id}: {event.percent:5.1f}% {event.step} {text}".rstrip(), file=self.stream)
        self._last_step = event.step

    def line(self, text: str) -> None:
        """A message above the bar (or a plain line)."""
        if self._progress is not None:
            self.console.print(text, markup=False)
        else:
            print(text, file=self.stream, flush=True)


# --- op records -------------------------------------------------------------------------------


def print_record(record: OpRecord, out: TextIO | None = None) -> None:
    """A readable summary of an op record: a rich panel-like layout on a terminal."""
    out = out or sys.stdout
    console = console_for(out)
    if not console.is_terminal:
        _print_record_plain(record, out)
        return
    head = Text.assemble(("op ", "dim"), (record.op_id, "bold"), "  ", record.kind, "  ")
    head.append_text(state_text(record.state))
    console.print(head)
    info = Table.grid(padding=(0, 2))
    info.add_column(style="dim")
    info.add_column()
    if record.host:
        info.add_row("host", record.host)
        info.add_row("image", record.image)
        info.add_row("attempts", str(record.attempts))
    if record.exit_code is not None:
        info.add_row("exit code", str(record.exit_code))
    if record.submitted_by:
        info.add_row("submitted by", record.submitted_by)
    duration = duration_s(record)
    if duration is not None:
        info.add_row("duration", format_duration(duration))
    console.print(info)
    if record.result:
        table = Table(title="result", title_justify="left", show_header=False, box=None, padding=(0, 2))
        table.add_column(style="cyan")
        table.add_column(overflow="fold")
        for key, value in record.result.items():
            table.add_row(key, render_value(value))
        console.print(table)
    if record.artifacts:
        table = Table(title="artifacts", title_justify="left", show_header=False, box=None, padding=(0, 2))
        for name, digest in record.artifacts.items():
            table.add_row(name, Text(digest, style="dim"))
        console.print(table)
    if record.error:
        console.print(Text(f"error ({record.error.reason}): {record.error.message}", style="bold red"))
        if record.error.field:
            console.print(f"  field: {record.error.field}", markup=False)
    if record.cancel:
        forced = " (forced)" if record.cancel.forced else ""
        forced += "; partial results saved (artifacts above)" if record.cancel.partial_saved else ""
        console.print(
            Text(f"cancelled{forced}: {record.cancel.reason or 'no reason given'}", style="magenta")
        )
    if record.state == "failed" and record.log_tail:
        console.print(Text("last log lines:", style="dim"))
        for line in record.log_tail[-10:]:
            console.print(f"  {line}", markup=False, highlight=False)
    runs = run_lines(record)
    if runs:
        console.print(Text("runs:", style="dim"))
        for line in runs:
            console.print(f"  {line}", markup=False, highlight=False)


def record_json(record: OpRecord) -> str:
    """The op record as one JSON object."""
    return msgspec.json.encode(record).decode()


def run_lines(record: OpRecord) -> list[str]:
    """One line per run of an op that an operator requeued (none when it ran once):
    each ended run with its outcome and who requeued it, then the current one."""
    if not record.history:
        return []
    lines = []
    for ended in record.history:
        outcome = ended.state
        if ended.error is not None:
            outcome += f" ({ended.error.reason}: {ended.error.message})"
        elif ended.exit_code is not None:
            outcome += f" (exit {ended.exit_code})"
        where = f" on {ended.host}" if ended.host else ""
        why = f": {ended.requeue_reason}" if ended.requeue_reason else ""
        run = f"attempt {ended.attempt}" if ended.attempt else "before its first attempt"
        lines.append(f"{run}{where}: {outcome}; requeued by {ended.requeued_by}{why}")
    where = f" on {record.host}" if record.host else ""
    lines.append(
        f"attempt {max(record.attempts, record.history[-1].attempt + 1)}{where}: {record.state} (latest)"
    )
    return lines


def _print_record_plain(record: OpRecord, out: TextIO) -> None:
    print(f"op {record.op_id}  kind={record.kind}  state={record.state}", file=out)
    if record.host:
        print(f"  host={record.host}  image={record.image}  attempts={record.attempts}", file=out)
    if record.exit_code is not None:
        print(f"  exit_code={record.exit_code}", file=out)
    duration = duration_s(record)
    if duration is not None:
        print(f"  duration={duration:.2f}s", file=out)
    if record.result:
        print("  result:", file=out)
        for key, value in record.result.items():
            print(f"    {key:<24} {render_value(value)}", file=out)
    if record.artifacts:
        print("  artifacts:", file=out)
        for name, digest in record.artifacts.items():
            print(f"    {name:<24} {digest}", file=out)
    if record.error:
        print(f"  error ({record.error.reason}): {record.error.message}", file=out)
        if record.error.field:
            print(f"    field: {record.error.field}", file=out)
    if record.cancel:
        forced = " (forced)" if record.cancel.forced else ""
        forced += "; partial results saved (artifacts above)" if record.cancel.partial_saved else ""
        print(f"  cancelled{forced}: {record.cancel.reason or 'no reason given'}", file=out)
    if record.state == "failed" and record.log_tail:
        print("  last log lines:", file=out)
        for line in record.log_tail[-10:]:
            print(f"    {line}", file=out)
    runs = run_lines(record)
    if runs:
        print("  runs:", file=out)
        for line in runs:
            print(f"    {line}", file=out)


def print_ops(records: list[OpRecord], out: TextIO | None = None) -> None:
    """The ops table: rich on a terminal, fixed-width columns elsewhere."""
    out = out or sys.stdout
    console = console_for(out)
    if not console.is_terminal:
        print(f"{'OP':<28} {'KIND':<12} {'STATE':<10} {'HOST':<14} {'PROGRESS':>8}  SUBMITTED", file=out)
        for r in records:
            submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(submitted_at(r)))
            pct = f"{r.progress.percent:.0f}%" if r.progress else ""
            print(
                f"{r.op_id:<28} {r.kind:<12} {r.state:<10} {r.host[:14]:<14} {pct:>8}  {submitted}", file=out
            )
        return
    table = Table(header_style="bold", box=None, padding=(0, 1))
    for name, justify in (
        ("OP", "left"),
        ("KIND", "left"),
        ("STATE", "left"),
        ("HOST", "left"),
        ("PROGRESS", "right"),
        ("ELAPSED", "right"),
        ("METRIC", "left"),
        ("SUBMITTED", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in records:
        pct = f"{r.progress.percent:.0f}%" if r.progress else ""
        table.add_row(
            r.op_id,
            r.kind,
            state_text(r.state),
            r.host,
            pct,
            format_duration(duration_s(r)),
            metric_text(r),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(submitted_at(r))),
        )
    console.print(table)
    if not records:
        console.print(Text("no ops", style="dim"))
