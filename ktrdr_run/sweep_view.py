"""How a sweep's result is shown: the leaderboard, a summary line and, for a grid over two
parameters, a heatmap of the objective. Pure functions of the ``sweep`` op's ``result``
dict: plain text for pipes and files, rich renderables for a terminal.

The heatmap shades each cell by how good its value is: ``.`` (worst) to ``@`` (best) in
plain text, red to green on a terminal; "best" is the highest value when maximising and
the lowest when minimising. Rows are the ``y`` values and columns the ``x`` values, both
in the order the result lists them; a cell without a value shows ``·``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from ktrdr_run.formats import format_metric
from ktrdr_run.render import format_duration

#: Metrics shown beside the objective in the leaderboard (the objective is not repeated).
KEY_METRICS = ("total_return", "sharpe_ratio", "max_drawdown", "total_trades", "win_rate")
#: Plain-text shades, worst to best.
SHADES = ".:-=+*#%@"
NO_VALUE = "·"
# Red (worst) through yellow to green (best): RdYlGn's ends and middle.
_GRADIENT = ((215, 48, 39), (254, 224, 139), (26, 152, 80))


def objective(result: Mapping[str, Any]) -> tuple[str, bool]:
    """(metric name, minimise?) from the result's ``maximize`` (``-name`` minimises)."""
    text = str(result.get("maximize") or "final_equity").strip()
    return (text[1:].strip(), True) if text.startswith("-") else (text, False)


def format_param(value: Any) -> str:
    """A parameter value as the leaderboard shows it: ``10``, ``0.25``, ``ema``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def param_names(result: Mapping[str, Any]) -> list[str]:
    """The swept parameters: ``param_names``, else those the leaderboard entries set."""
    names = list(result.get("param_names") or [])
    for entry in result.get("leaderboard") or []:
        names += [name for name in entry.get("params") or {} if name not in names]
    return names


def has_validation(result: Mapping[str, Any]) -> bool:
    """Whether the sweep re-ran its leaders out of sample."""
    return bool(result.get("validation")) or any(
        entry.get("validation") for entry in result.get("leaderboard") or []
    )


# --- the leaderboard ---------------------------------------------------------------------


def leaderboard_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The leaderboard as (headers, rows of cells): rank, each parameter, the objective
    (in-sample ``IS`` and out-of-sample ``OOS`` side by side when validated), then
    :data:`KEY_METRICS`."""
    metric, minimize = objective(result)
    names = param_names(result)
    validated = has_validation(result)
    label = f"{metric} (min)" if minimize else metric
    headers = ["#", *names]
    headers += [f"IS {label}", f"OOS {label}"] if validated else [label]
    others = [m for m in KEY_METRICS if m != metric]
    headers += others
    rows: list[list[str]] = []
    for entry in result.get("leaderboard") or []:
        params = entry.get("params") or {}
        metrics = entry.get("metrics") or {}
        row = [str(entry.get("rank", len(rows) + 1))]
        row += [format_param(params[name]) if name in params else "" for name in names]
        row.append(format_metric(metric, entry.get("value")))
        if validated:
            row.append(format_metric(metric, (entry.get("validation") or {}).get(metric)))
        row += [format_metric(name, metrics.get(name)) for name in others]
        rows.append(row)
    return headers, rows


def leaderboard_lines(result: Mapping[str, Any]) -> list[str]:
    """The leaderboard as fixed-width lines (parameters left-aligned, numbers right)."""
    headers, rows = leaderboard_rows(result)
    if not rows:
        return ["(no combination has a result)"]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    left = set(range(1, 1 + len(param_names(result))))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def leaderboard_table(result: Mapping[str, Any]) -> Table:
    """The leaderboard as a rich table, the leader in bold green."""
    headers, rows = leaderboard_rows(result)
    names = len(param_names(result))
    table = Table(header_style="bold", box=None, padding=(0, 1), title_justify="left")
    for i, header in enumerate(headers):
        if 0 < i <= names:
            table.add_column(header, justify="left", style="cyan")
        else:
            table.add_column(header, justify="right")
    for i, row in enumerate(rows):
        table.add_row(*row, style="bold green" if i == 0 else "")
    return table


def validation_note(result: Mapping[str, Any]) -> str | None:
    """What IS and OOS mean, with both periods; None without validation."""
    if not has_validation(result):
        return None
    period = result.get("period") or {}
    window = result.get("validation") or {}
    inside = f"{period.get('first_bar', '?')} .. {period.get('last_bar', '?')}"
    outside = f"{window.get('start', '?')} .. {window.get('end', '?')}"
    return f"IS = in-sample ({inside}), OOS = out-of-sample ({outside})"


# --- the summary ---------------------------------------------------------------------------


def best_text(result: Mapping[str, Any]) -> str:
    """``fast=10 slow=30 → sharpe_ratio 1.2345``, or ``none`` without a defined value."""
    best = result.get("best")
    if not best or best.get("value") is None:
        return "none"
    metric, _ = objective(result)
    params = " ".join(f"{k}={format_param(v)}" for k, v in (best.get("params") or {}).items())
    return f"{params} → {metric} {format_metric(metric, best['value'])}"


def summary_line(result: Mapping[str, Any]) -> str:
    """Counts, children, time and rate, and the best parameters, on one line."""
    parts = [f"{result.get('done', 0):,}/{result.get('total', 0):,} combinations"]
    for key, label in (
        ("failed", "failed"),
        ("zero_trade", "zero-trade"),
        ("excluded", "excluded"),
        ("invalid", "invalid"),
    ):
        if key in result:
            parts.append(f"{result[key]:,} {label}")
    if "children" in result:
        parts.append(f"{result['children']} chunk op{'s' if result['children'] != 1 else ''}")
    elapsed = _number(result.get("elapsed_s"))
    if elapsed is not None:
        parts.append(format_duration(elapsed))
    rate = _number(result.get("combos_per_s"))
    if rate is not None:
        parts.append(f"{rate:,.1f} combos/s")
    parts.append(f"best {best_text(result)}")
    return " · ".join(parts)


# --- the heatmap -----------------------------------------------------------------------------


def shade_levels(surface: Mapping[str, Any], minimize: bool, levels: int) -> list[list[int | None]]:
    """Each cell's level, 0 (worst) to ``levels - 1`` (best), None without a value:
    ``round(t * (levels - 1))`` with ``t`` the value's place between the min and max
    (``1 - t`` when minimising). All cells equal: every one is the best level."""
    values = [[_number(v) for v in row] for row in surface.get("values") or []]
    defined = [v for row in values for v in row if v is not None]
    if not defined:
        return [[None for _ in row] for row in values]
    lo, hi = min(defined), max(defined)
    out: list[list[int | None]] = []
    for row in values:
        cells: list[int | None] = []
        for value in row:
            if value is None:
                cells.append(None)
                continue
            t = (value - lo) / (hi - lo) if hi > lo else 1.0
            cells.append(round((1.0 - t if minimize and hi > lo else t) * (levels - 1)))
        out.append(cells)
    return out


def _value_range(surface: Mapping[str, Any]) -> tuple[float, float] | None:
    defined = [v for row in surface.get("values") or [] for v in map(_number, row) if v is not None]
    return (min(defined), max(defined)) if defined else None


def _axes(surface: Mapping[str, Any]) -> tuple[list[str], list[str], int, int]:
    xs = [format_param(x) for x in surface.get("xs") or []]
    ys = [format_param(y) for y in surface.get("ys") or []]
    cell = max([2, *(len(x) for x in xs)])
    label = max([len(str(surface.get("y", ""))), *(len(y) for y in ys)])
    return xs, ys, cell, label


def _title(surface: Mapping[str, Any], metric: str) -> str:
    return f"{metric} by {surface.get('x')} (columns) and {surface.get('y')} (rows)"


def heatmap_legend(surface: Mapping[str, Any], metric: str, minimize: bool) -> str:
    """``. min 9,812.30 … @ max 12,345.60 (higher is better); · no value``."""
    span = _value_range(surface)
    if span is None:
        return f"no cell has a value ({NO_VALUE})"
    lo, hi = (format_metric(metric, v) for v in span)
    worst, best = (f"max {hi}", f"min {lo}") if minimize else (f"min {lo}", f"max {hi}")
    better = "lower" if minimize else "higher"
    return f"{SHADES[0]} {worst} … {SHADES[-1]} {best} ({better} is better); {NO_VALUE} no value"


def heatmap_lines(surface: Mapping[str, Any], metric: str, minimize: bool) -> list[str]:
    """The surface as plain text: a title, the x values, then one row per y value with a
    shade per cell (see the module doc), and a legend with the min and the max."""
    xs, ys, cell, label = _axes(surface)
    levels = shade_levels(surface, minimize, len(SHADES))
    lines = [_title(surface, metric)]
    lines.append(f"{str(surface.get('y', '')).rjust(label)} " + " ".join(x.rjust(cell) for x in xs))
    for y, row in zip(ys, levels, strict=False):
        cells = [NO_VALUE.center(cell) if lv is None else SHADES[lv] * cell for lv in row]
        lines.append(f"{y.rjust(label)} " + " ".join(cells))
    lines.append(heatmap_legend(surface, metric, minimize))
    return [line.rstrip() for line in lines]


def _colour(t: float) -> str:
    """The gradient's colour at ``t`` in [0, 1], as a rich colour."""
    low, high, t = (_GRADIENT[0], _GRADIENT[1], t * 2) if t < 0.5 else (_GRADIENT[1], _GRADIENT[2], t * 2 - 1)
    r, g, b = (round(a + (z - a) * t) for a, z in zip(low, high, strict=True))
    return f"rgb({r},{g},{b})"


def heatmap_text(surface: Mapping[str, Any], metric: str, minimize: bool) -> Text:
    """The surface as coloured blocks for a terminal (same layout as :func:`heatmap_lines`)."""
    steps = 64
    xs, ys, cell, label = _axes(surface)
    levels = shade_levels(surface, minimize, steps)
    text = Text()
    text.append(_title(surface, metric), style="bold")
    text.append(f"\n{str(surface.get('y', '')).rjust(label)} ", style="dim")
    text.append(" ".join(x.rjust(cell) for x in xs), style="dim")
    for y, row in zip(ys, levels, strict=False):
        text.append(f"\n{y.rjust(label)} ", style="dim")
        for i, lv in enumerate(row):
            if i:
                text.append(" ")
            if lv is None:
                text.append(NO_VALUE.center(cell), style="dim")
            else:
                text.append(" " * cell, style=f"on {_colour(lv / (steps - 1))}")
    span = _value_range(surface)
    text.append("\n")
    if span is None:
        text.append(f"no cell has a value ({NO_VALUE})", style="dim")
        return text
    lo, hi = (format_metric(metric, v) for v in span)
    worst, best = (f"max {hi}", f"min {lo}") if minimize else (f"min {lo}", f"max {hi}")
    text.append(f"{worst} ", style="dim")
    for i in range(9):
        text.append(" ", style=f"on {_colour(i / 8)}")
    text.append(f" {best} ({'lower' if minimize else 'higher'} is better); {NO_VALUE} no value", style="dim")
    return text
