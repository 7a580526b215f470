"""Terminal charts of a backtest: braille line and area charts, and sparklines.

No plotting library: a chart is a grid of Unicode braille cells (U+2800-U+28FF), each 2
dots wide and 4 dots high, so a chart ``w`` cells wide and ``h`` rows high has ``2w`` dot
columns and ``4h`` dot rows. Every character used is one terminal cell wide.

How values are placed (tests and callers can rely on it): with ``n`` values and ``C`` dot
columns, when ``n >= C`` value ``i`` falls in dot column ``i * C // n`` and each column
draws the min and the max of its values (so a one-bar spike is never lost); when
``n < C`` value ``i`` sits at column ``round(i * (C - 1) / (n - 1))`` and the columns in
between are interpolated. Dot rows are ``round((v - lo) / (hi - lo) * (4h - 1))`` from
the bottom. Non-finite values are not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from rich.cells import cell_len
from rich.text import Text

if TYPE_CHECKING:
    import pandas as pd

Fill = Literal["none", "below", "above"]

BRAILLE_BLANK = "\u2800"
SPARK_CHARS = "▁▂▃▄▅▆▇█"
EQUITY_ROWS = 10
DRAWDOWN_ROWS = 5
# Bit of each dot in a braille cell, by [dot row from the top][dot column].
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_AXIS_TICK = "┤"
_AXIS = "│"


def format_number(value: float) -> str:
    """A compact axis label: no decimals from 1,000 up, two below, three digits under 1."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1 or value == 0:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def format_percent(value: float) -> str:
    """An axis label for a value already in percent (``-12.345`` → ``-12.35 %``)."""
    return f"{value:,.2f} %"


def time_format(stamps: pd.Series | pd.DatetimeIndex) -> str:
    """The strftime pattern for these timestamps: the date alone when all are at midnight."""
    import pandas as pd

    index = pd.DatetimeIndex(stamps)
    if len(index) and bool((index.normalize() != index).any()):
        return "%Y-%m-%d %H:%M"
    return "%Y-%m-%d"


def _column_ranges(values: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per dot column, the min and the max of what is drawn there (NaN: nothing)."""
    n = values.shape[0]
    lo = np.full(columns, np.nan)
    hi = np.full(columns, np.nan)
    if n == 0:
        return lo, hi
    if n >= columns:
        col = np.arange(n) * columns // n
        starts = np.searchsorted(col, np.arange(columns))
        return np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)
    if n == 1:
        return np.full(columns, values[0]), np.full(columns, values[0])
    # Fewer values than columns: each column spans [x - 0.5, x + 0.5] of a piecewise-linear
    # line through the values, whose extremes are at the span's ends or at a value inside.
    positions = np.arange(n) * (columns - 1) / (n - 1)
    x = np.arange(columns, dtype=np.float64)
    left = np.interp(np.clip(x - 0.5, 0, columns - 1), positions, values)
    right = np.interp(np.clip(x + 0.5, 0, columns - 1), positions, values)
    lo = np.fmin(left, right)
    hi = np.fmax(left, right)
    nodes = np.clip(np.floor(positions + 0.5).astype(np.int64), 0, columns - 1)
    np.fmin.at(lo, nodes, values)
    np.fmax.at(hi, nodes, values)
    return lo, hi


def _dot_rows(values: np.ndarray, lo: float, hi: float, dots: int, fill: Fill) -> np.ndarray:
    """Dot row (0 = bottom) of each value; NaN stays NaN."""
    if hi > lo:
        return np.clip(np.rint((values - lo) / (hi - lo) * (dots - 1)), 0, dots - 1)
    # A flat series: on the top edge for a drop chart hanging from it, else mid-height.
    level = dots - 1 if fill == "above" else (dots - 1) // 2
    return np.where(np.isnan(values), np.nan, float(level))


def _plot(values: np.ndarray, cols: int, height: int, fill: Fill, lo: float, hi: float) -> list[str]:
    """The braille rows (top first) of the plot area, each exactly ``cols`` cells."""
    dots = 4 * height
    col_lo, col_hi = _column_ranges(values, 2 * cols)
    rows_lo = _dot_rows(col_lo, lo, hi, dots, fill)
    rows_hi = _dot_rows(col_hi, lo, hi, dots, fill)
    grid = [[0] * cols for _ in range(height)]
    prev: tuple[int, int] | None = None
    for x in range(2 * cols):
        if np.isnan(rows_lo[x]):
            prev = None
            continue
        first, last = int(rows_lo[x]), int(rows_hi[x])
        if fill == "below":
            first = 0
        elif fill == "above":
            last = dots - 1
        elif prev is not None:
            # Join to the previous column without repeating its extremes, so a column's
            # lowest and highest dots stay its own values.
            first = min(first, prev[1] + 1)
            last = max(last, prev[0] - 1)
        prev = (int(rows_lo[x]), int(rows_hi[x]))
        for row in range(first, last + 1):
            from_top = dots - 1 - row
            grid[from_top // 4][x // 2] |= _DOT_BITS[from_top % 4][x % 2]
    return ["".join(chr(0x2800 + bits) for bits in line) for line in grid]


def _finite_range(values: np.ndarray) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _labels(lo: float, hi: float, height: int, fmt: Callable[[float], str]) -> list[str]:
    labels = [""] * height
    labels[0] = fmt(hi)
    if height > 1:
        labels[-1] = fmt(lo)
    return labels


def line_chart(
    values: Sequence[float] | np.ndarray,
    *,
    width: int,
    height: int,
    fill: Fill = "none",
    y_range: tuple[float, float] | None = None,
    fmt: Callable[[float], str] = format_number,
    label_width: int | None = None,
) -> list[str]:
    """A braille line (or area) chart: ``height`` lines of exactly ``width`` cells.

    Each line starts with the y-axis column: the top line is labelled with the max, the
    bottom line with the min (formatted by ``fmt``), then ``┤`` (``│`` on unlabelled
    lines), then the plot. ``fill="below"`` shades from the line down to the bottom,
    ``fill="above"`` from the line up to the top (a drawdown hanging from 0).
    ``y_range`` (lo, hi) fixes the scale instead of the data's min and max;
    ``label_width`` fixes the label column so stacked charts line up. Raises ValueError
    when ``width`` leaves no plot column or ``height`` is below 1.
    """
    if height < 1:
        raise ValueError(f"height must be at least 1, got {height}")
    arr = np.asarray(values, dtype=np.float64).ravel()
    span = y_range if y_range is not None else _finite_range(arr)
    if span is None:
        labels = ["n/a"] + [""] * (height - 1)
        lo = hi = 0.0
    else:
        lo, hi = float(span[0]), float(span[1])
        labels = _labels(lo, hi, height, fmt)
    lw = max(max(cell_len(label) for label in labels), label_width or 0)
    cols = width - lw - 2
    if cols < 1:
        raise ValueError(f"width {width} leaves no room for the plot after {lw + 2} label cells")
    plot = _plot(arr, cols, height, fill, lo, hi) if span is not None else [BRAILLE_BLANK * cols] * height
    return [
        f"{label:>{lw}} {_AXIS_TICK if label else _AXIS}{row}"
        for label, row in zip(labels, plot, strict=True)
    ]


def sparkline(values: Sequence[float] | np.ndarray, width: int) -> str:
    """A one-line chart of at most ``width`` cells from ``▁▂▃▄▅▆▇█``.

    More values than ``width`` are averaged per column (value ``i`` in column
    ``i * width // n``); fewer get one cell each. A flat series is all ``▄``; non-finite
    values are blank cells.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    n = arr.shape[0]
    if width < 1 or n == 0:
        return ""
    if n > width:
        col = np.arange(n) * width // n
        starts = np.searchsorted(col, np.arange(width))
        finite = np.isfinite(arr)
        sums = np.add.reduceat(np.where(finite, arr, 0.0), starts)
        counts = np.add.reduceat(finite.astype(np.int64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            arr = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    span = _finite_range(arr)
    if span is None:
        return " " * arr.shape[0]
    lo, hi = span
    top = len(SPARK_CHARS) - 1
    out = []
    for value in arr:
        if not math.isfinite(value):
            out.append(" ")
        elif hi > lo:
            out.append(SPARK_CHARS[round((value - lo) / (hi - lo) * top)])
        else:
            out.append(SPARK_CHARS[3])
    return "".join(out)


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells, with an ellipsis when cut."""
    if cell_len(text) <= width:
        return text
    out = ""
    for char in text:
        if cell_len(out + char) > width - 1:
            break
        out += char
    return out + "…"


def drawdown_series(equity: pd.DataFrame) -> np.ndarray:
    """The drawdown per bar as a fraction of the running peak (0.12 = 12 % below it): the
    ``drawdown_pct`` column when there is one, else computed from ``equity``."""
    if "drawdown_pct" in equity.columns:
        return equity["drawdown_pct"].to_numpy(dtype=np.float64)
    values = equity["equity"].to_numpy(dtype=np.float64)
    peak = np.fmax.accumulate(values) if values.size else values
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(peak > 0, (peak - values) / peak, 0.0)


def _backtest_parts(equity: pd.DataFrame, width: int) -> tuple[list[tuple[str, str]], int]:
    """The chart's lines tagged by part (title, equity, dd_title, drawdown, axis, dates),
    and the width of the label column plus the axis (where the plots start)."""
    import pandas as pd

    values = equity["equity"].to_numpy(dtype=np.float64) if len(equity) else np.zeros(0)
    if values.size == 0 or _finite_range(values) is None:
        return [("title", _fit("Equity: no bars", width))], 0
    eq_lo, eq_hi = _finite_range(values) or (0.0, 0.0)
    dd = np.nan_to_num(drawdown_series(equity), nan=0.0)
    deepest = int(np.argmax(dd))
    dd_max = float(dd[deepest])
    stamps = pd.DatetimeIndex(equity["timestamp"])
    pattern = time_format(stamps)
    first, last = stamps[0].strftime(pattern), stamps[-1].strftime(pattern)

    eq_labels = (format_number(eq_lo), format_number(eq_hi))
    dd_floor = -dd_max * 100 + 0.0  # + 0.0 turns -0.0 into 0.0 for the label
    dd_labels = (format_percent(dd_floor), format_percent(0.0))
    lw = max(cell_len(label) for label in (*eq_labels, *dd_labels))
    cols = width - lw - 2
    if cols < 1:
        raise ValueError(f"width {width} is too narrow for a chart with {lw}-cell axis labels")

    start, end = float(values[0]), float(values[-1])
    change = f"  ({(end / start - 1) * 100:+,.2f} %)" if start > 0 else ""
    title = f"Equity  {format_number(start)} → {format_number(end)}{change}"
    parts: list[tuple[str, str]] = [("title", _fit(title, width))]
    parts += [
        ("equity", line)
        for line in line_chart(values, width=width, height=EQUITY_ROWS, fill="none", label_width=lw)
    ]
    dd_title = f"Drawdown  max {dd_max * 100:,.2f} %"
    if dd_max > 0:
        dd_title += f" on {stamps[deepest].strftime(pattern)}"
    parts.append(("dd_title", _fit(dd_title, width)))
    parts += [
        ("drawdown", line)
        for line in line_chart(
            -dd * 100,
            width=width,
            height=DRAWDOWN_ROWS,
            fill="above",
            y_range=(dd_floor, 0.0),
            fmt=format_percent,
            label_width=lw,
        )
    ]
    parts.append(("axis", " " * (lw + 1) + "└" + "─" * cols))
    if first == last or len(first) + 1 + len(last) > cols:
        dates = _fit(first, cols)
    else:
        dates = first + " " * (cols - len(first) - len(last)) + last
    parts.append(("dates", " " * (lw + 2) + dates))
    return parts, lw + 2


def backtest_chart(equity: pd.DataFrame, *, width: int = 80) -> list[str]:
    """The equity curve (10 rows) over its drawdown (5 rows, hanging from 0), as text.

    ``equity`` is the ``equity_curve`` artifact read into a DataFrame (columns
    ``timestamp``, ``equity`` and, if present, ``drawdown_pct`` as a fraction; otherwise
    the drawdown is computed from ``equity``). The lines are: a title with the first and
    last equity, the equity chart, a drawdown title with its max and date, the drawdown
    chart, the x axis and the first and last bar's dates. Every line is at most ``width``
    cells. Raises ValueError when ``width`` leaves no plot column.
    """
    parts, _ = _backtest_parts(equity, width)
    return [line for _, line in parts]


def backtest_chart_text(equity: pd.DataFrame, *, width: int = 80) -> Text:
    """:func:`backtest_chart` as a rich ``Text`` with colour: the equity curve green (red
    when it ends below its start), the drawdown red, the axes dim."""
    parts, prefix = _backtest_parts(equity, width)
    values = equity["equity"].to_numpy(dtype=np.float64) if len(equity) else np.zeros(0)
    gained = values.size > 0 and values[-1] >= values[0]
    plot_style = {"equity": "green" if gained else "red", "drawdown": "red"}
    text = Text()
    for i, (kind, line) in enumerate(parts):
        if i:
            text.append("\n")
        if kind in plot_style:
            text.append(line[:prefix], style="dim")
            text.append(line[prefix:], style=plot_style[kind])
        else:
            text.append(line, style="bold" if kind.endswith("title") else "dim")
    return text
