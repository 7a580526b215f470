"""A sweep's part of the op detail: its standing, its leaderboard and its best-so-far curve.

A finished (or cancelled) sweep shows ``record.result``: the leaderboard and the
``best_curve``. A running one shows its progress line and a curve of the best objective
value against combinations done, gathered from every progress report the screen sees
(the replayed progress events and the newer records from the watch).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import DataTable, Static

from ktrdr_run.charts import format_number, line_chart
from runner.protocol import OpRecord
from runner.sweep.objective import DEFAULT_MAXIMIZE
from tui.format import metric_value, param_value

#: (metric, header) of what every leaderboard row shows after the objective (the objective
#: itself is not repeated when it is one of them).
LEADERBOARD_METRICS: tuple[tuple[str, str], ...] = (
    ("total_return", "return"),
    ("sharpe_ratio", "sharpe"),
    ("max_drawdown", "max dd"),
    ("total_trades", "trades"),
)
#: Rows of the curve's plot (each 4 braille dots high).
CURVE_ROWS = 5
#: The most (done, best) points kept for a running sweep; beyond it every other one is dropped.
MAX_POINTS = 512


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _objective(maximize: str) -> tuple[str, bool]:
    """(metric name, minimised) of a ``maximize`` string."""
    text = maximize.strip() or DEFAULT_MAXIMIZE
    return (text[1:].strip(), True) if text.startswith("-") else (text, False)


def _objective_label(maximize: str) -> str:
    metric, minimize = _objective(maximize)
    return f"{metric} {'▼' if minimize else '▲'}"


class BestHistory:
    """The best objective value against combinations done, as progress reports it: one
    point per ``done`` (the newest report wins), at most ``cap`` points. Past the cap
    every other point is dropped (the first and the newest stay), so a long sweep keeps
    its whole span at a coarser step."""

    def __init__(self, cap: int = MAX_POINTS) -> None:
        self.cap = cap
        self._done: list[float] = []
        self._best: list[float] = []

    def __len__(self) -> int:
        return len(self._done)

    @property
    def points(self) -> list[tuple[float, float]]:
        """The points, by ``done``."""
        return list(zip(self._done, self._best, strict=True))

    def clear(self) -> None:
        """Forget every point."""
        self._done.clear()
        self._best.clear()

    def add(self, metrics: Mapping[str, float]) -> bool:
        """Note a progress report's ``done`` and ``best`` (ignored without both);
        whether the history changed."""
        done, best = _finite(metrics.get("done")), _finite(metrics.get("best"))
        if done is None or best is None:
            return False
        at = bisect.bisect_left(self._done, done)
        if at < len(self._done) and self._done[at] == done:
            if self._best[at] == best:
                return False
            self._best[at] = best
            return True
        self._done.insert(at, done)
        self._best.insert(at, best)
        if len(self._done) > self.cap:
            keep = [*range(0, len(self._done) - 1, 2), len(self._done) - 1]
            self._done = [self._done[i] for i in keep]
            self._best = [self._best[i] for i in keep]
        return True


def curve_lines(
    points: Iterable[tuple[float, float]], *, width: int, height: int, x_max: float | None = None
) -> list[str] | None:
    """The best-so-far curve as ``height`` braille chart lines and an x-axis label line,
    each at most ``width`` cells; None when there is nothing to draw or no room.

    The x axis runs from combination 1 to ``x_max`` (at least the last point's) over the
    ``2 * cols`` dot columns, column ``j`` at ``1 + j * (x_max - 1) / (2 * cols - 1)``; a
    point shows from its nearest column on, until the next point's (a step curve), and
    columns past the last point's stay blank (not run yet)."""
    pts = sorted((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y))
    if not pts:
        return None
    xs = np.array([x for x, _ in pts])
    ys = np.array([y for _, y in pts])
    lo, hi = float(ys.min()), float(ys.max())
    label_width = max(cell_len(format_number(lo)), cell_len(format_number(hi)))
    cols = width - label_width - 2
    if cols < 2:
        return None
    x_lo = min(1.0, float(xs[0]))
    x_hi = max(float(xs[-1]), x_max or 0.0, x_lo + 1.0)
    dots = 2 * cols
    step = (x_hi - x_lo) / (dots - 1)
    targets = x_lo + np.arange(dots) * step
    # a point counts from the column nearest to it, so the newest best is never skipped
    # for falling between two columns
    at = np.searchsorted(xs, targets + step / 2, side="right") - 1
    drawn = (at >= 0) & (targets <= xs[-1] + step / 2)
    values = np.where(drawn, ys[np.clip(at, 0, None)], np.nan)
    lines = line_chart(values, width=width, height=height, y_range=(lo, hi), label_width=label_width)
    first, last = f"{x_lo:,.0f}", f"{x_hi:,.0f}"
    gap = cols - cell_len(first) - cell_len(last)
    axis = first + " " * gap + last if gap > 0 else last
    lines.append(" " * (label_width + 2) + axis)
    return lines


class BestCurve(Widget):
    """The best objective value so far against combinations done, as a braille chart
    drawn to the widget's width."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.points: list[tuple[float, float]] = []
        self.x_max: float | None = None
        self.title = "best so far"
        self._drawn: tuple[int, list[str] | None] | None = None

    def show(self, points: list[tuple[float, float]], *, x_max: float | None, title: str) -> None:
        """Draw these points (x: combinations done, y: best value) up to ``x_max``."""
        self.points, self.x_max, self.title = points, x_max, title
        self._drawn = None
        self.refresh()

    @property
    def chart(self) -> list[str] | None:
        """The chart lines at the widget's width now (None: nothing drawn)."""
        width = self.content_size.width
        if self._drawn is None or self._drawn[0] != width:
            lines = curve_lines(self.points, width=width, height=CURVE_ROWS, x_max=self.x_max)
            self._drawn = (width, lines)
        return self._drawn[1]

    def render(self) -> Text:
        text = Text(self.title, style="bold")
        lines = self.chart
        if lines is None:
            text.append("  (nothing yet)" if not self.points else "", style="dim")
            return text
        *plot, axis = lines
        # the label column and the y axis are dim, the curve green
        prefix = len(axis) - len(axis.lstrip(" "))
        for line in plot:
            text.append("\n")
            text.append(line[:prefix], style="dim")
            text.append(line[prefix:], style="green")
        text.append("\n" + axis, style="dim")
        return text


class SweepView(Vertical):
    """What a ``sweep`` op's detail adds: the standing (combinations, children, best),
    the leaderboard once there is a result, and the best-so-far curve."""

    def __init__(self, *, id: str | None = None, cap: int = MAX_POINTS) -> None:
        super().__init__(id=id)
        self.history = BestHistory(cap)
        self.record: OpRecord | None = None
        self._board_shown: tuple[str, list[str], list[dict[str, Any]]] | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="sweep-status")
        yield DataTable(id="sweep-leaderboard", cursor_type="none", zebra_stripes=True)
        yield BestCurve(id="sweep-curve")

    @property
    def leaderboard(self) -> DataTable[Any]:
        """The leaderboard table."""
        return self.query_one("#sweep-leaderboard", DataTable)

    @property
    def curve(self) -> BestCurve:
        """The best-so-far curve."""
        return self.query_one(BestCurve)

    # -- feeding ---------------------------------------------------------------------

    def show_record(self, record: OpRecord) -> None:
        """Show a (newer) record of the sweep; its progress joins the curve."""
        self.record = record
        if record.progress is not None:
            self.history.add(record.progress.metrics)
        self._show()

    def add_progress(self, metrics: Mapping[str, float]) -> None:
        """A progress report of the sweep (a replayed or live progress event)."""
        if self.history.add(metrics) and self.record is not None:
            self._show_curve(self.record)

    def restart(self) -> None:
        """The event stream starts over: the curve is gathered again from its replay
        (keeping what the record shows now)."""
        self.history.clear()
        if self.record is not None:
            self.show_record(self.record)

    # -- drawing ---------------------------------------------------------------------

    def _show(self) -> None:
        record = self.record
        if record is None:
            return
        result = record.result or {}
        maximize = str(result.get("maximize") or record.params.get("maximize") or DEFAULT_MAXIMIZE)
        method = str(result.get("method") or record.params.get("method") or "grid")
        self.border_title = f"sweep · {method} · maximize {_objective_label(maximize)}"
        self.query_one("#sweep-status", Static).update(self._status(record, result, maximize))
        board = result.get("leaderboard")
        table = self.leaderboard
        table.display = bool(board)
        if board:
            self._show_board(result, maximize)
        self._show_curve(record)

    def _status(self, record: OpRecord, result: dict[str, Any], maximize: str) -> Text:
        metric, _ = _objective(maximize)
        metrics = record.progress.metrics if record.progress is not None else {}
        text = Text()
        counts = result or metrics
        if counts:
            done, total = _finite(counts.get("done")) or 0, _finite(counts.get("total")) or 0
            text.append(f"{done:,.0f}/{total:,.0f} combinations", style="bold")
            for key, label in (
                ("succeeded", "ok"),
                ("failed", "failed"),
                ("zero_trade", "zero-trade"),
                ("invalid", "invalid"),
                ("excluded", "excluded"),
            ):
                count = _finite(counts.get(key))
                # a result always says how many succeeded and failed, the rest only when some did
                if count or (count is not None and result and key in ("succeeded", "failed")):
                    text.append(f" · {count:,.0f} {label}", style="red" if key == "failed" and count else "")
            rate, elapsed = _finite(counts.get("combos_per_s")), _finite(result.get("elapsed_s"))
            if rate is not None:
                text.append(f" · {rate:,.1f}/s", style="dim")
            if elapsed is not None:
                text.append(f" in {elapsed:,.1f}s", style="dim")
        else:
            text.append("no combination reported yet", style="dim")
        text.append("\n")
        text.append_text(self._children(record, result, metrics))
        best = result.get("best") if result else None
        if isinstance(best, dict):
            text.append("\nbest ", style="dim")
            text.append(f"{metric} {metric_value(metric, best.get('value'))}", style="bold green")
            text.append(f"  ({_params_text(best.get('params') or {})})")
            validation = best.get("validation")
            if isinstance(validation, dict):
                text.append(f"  out-of-sample {metric_value(metric, validation.get(metric))}", style="cyan")
        elif _finite(metrics.get("best")) is not None:
            text.append("\nbest so far ", style="dim")
            text.append(f"{metric} {metric_value(metric, metrics['best'])}", style="bold green")
        period = result.get("validation") if result else None
        if isinstance(period, dict):
            text.append(f"\nvalidated on {period.get('start', '?')} → {period.get('end', '?')}", style="dim")
        return text

    @staticmethod
    def _children(record: OpRecord, result: dict[str, Any], metrics: Mapping[str, float]) -> Text:
        total = _finite(metrics.get("children_total"))
        count = len(record.children) or int(total or 0) or int(_finite(result.get("children")) or 0)
        done = _finite(metrics.get("children_done"))
        text = Text("children: ", style="dim")
        text.append(f"{count}")
        if done is not None:
            text.append(f" ({done:.0f} done)")
        return text

    def _show_board(self, result: dict[str, Any], maximize: str) -> None:
        board: list[dict[str, Any]] = result["leaderboard"]
        names: list[str] = list(result.get("param_names") or [])
        for entry in board:  # names missing from param_names still get a column
            names += [name for name in entry.get("params") or {} if name not in names]
        metric, _ = _objective(maximize)
        validated = any(isinstance(entry.get("validation"), dict) for entry in board)
        extra = [(name, label) for name, label in LEADERBOARD_METRICS if name != metric]
        shown = (maximize, names, board)
        if shown == self._board_shown:
            return  # a newer record with the same result: the table stays as it is
        self._board_shown = shown
        table = self.leaderboard
        table.clear(columns=True)
        table.add_column("#", key="rank")
        for name in names:
            table.add_column(name, key=f"param:{name}")
        table.add_column(_objective_label(maximize), key="value")
        if validated:
            table.add_column("out-of-sample", key="oos")
        for name, label in extra:
            table.add_column(label, key=name)
        for entry in board:
            params = entry.get("params") or {}
            metrics = entry.get("metrics") or {}
            row: list[Text] = [Text(str(entry.get("rank", "")), justify="right")]
            row += [Text(param_value(params[n]) if n in params else "-", justify="right") for n in names]
            row.append(Text(metric_value(metric, entry.get("value")), style="bold", justify="right"))
            if validated:
                validation = entry.get("validation")
                oos = validation.get(metric) if isinstance(validation, dict) else None
                row.append(Text(metric_value(metric, oos), style="cyan", justify="right"))
            row += [Text(metric_value(name, metrics.get(name)), justify="right") for name, _ in extra]
            table.add_row(*row, key=str(entry.get("rank", len(table.rows) + 1)))

    def _show_curve(self, record: OpRecord) -> None:
        result = record.result or {}
        maximize = str(result.get("maximize") or record.params.get("maximize") or DEFAULT_MAXIMIZE)
        label = _objective_label(maximize)
        curve = result.get("best_curve")
        if curve:
            points = [(float(x), float(y)) for x, y in curve if None not in (_finite(x), _finite(y))]
            x_max = _finite(result.get("total"))
            self.curve.show(points, x_max=x_max, title=f"best {label} so far, by combinations done")
            return
        metrics = record.progress.metrics if record.progress is not None else {}
        self.curve.show(
            self.history.points,
            x_max=_finite(metrics.get("total")),
            title=f"best {label} so far, by combinations done ({len(self.history)} reports)",
        )


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={param_value(value)}" for name, value in params.items())
