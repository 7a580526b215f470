"""A one-file HTML report of a completed backtest.

The page stands alone: inline CSS, charts drawn here as inline SVG, a few lines of inline
JavaScript for the crosshair tooltip, and no URL of any kind, so it opens offline and can be
mailed or archived as it is. It shows the equity curve with a marker for every entry and
every exit, the drawdown, the metrics (formatted as ``ktrdr-run backtest`` prints them), the
params and the first :data:`MAX_TRADE_ROWS` trades.

Markers carry stable attributes for tools and tests: ``class="trade-marker entry long"``
(or ``exit``/``short``), ``data-time`` (ISO 8601 UTC) and ``data-trade`` (the row number).
Each chart's ``<svg>`` carries its plot box and value range (``data-x0``, ``data-x1``,
``data-y-top``, ``data-y-bottom``, ``data-vmin``, ``data-vmax``, ``data-bars``): bar ``i``
of ``n`` is at ``x0 + i / (n - 1) * (x1 - x0)``, and ``vmax`` is drawn at ``y-top``.
"""

from __future__ import annotations

import html
import importlib.resources
import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ktrdr_run.charts import drawdown_series, time_format
from ktrdr_run.formats import format_metric
from runner.protocol import OpRecord

MAX_POINTS = 2000
MAX_TRADE_ROWS = 200
KPI_METRICS = (
    "total_return_pct",
    "sharpe_ratio",
    "max_drawdown_pct",
    "total_trades",
    "win_rate",
    "final_equity",
)
# Metrics coloured green above zero and red below it.
SIGNED_METRICS = frozenset(
    {"total_return", "total_return_pct", "annualized_return", "sharpe_ratio", "sortino_ratio"}
)
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_WIDTH = 960
_LEFT, _RIGHT, _TOP, _BOTTOM = 78.0, 944.0, 14.0, 30.0  # _BOTTOM: margin below the plot
_EQUITY_HEIGHT = 340
_DRAWDOWN_HEIGHT = 180


def _asset(name: str) -> str:
    """The report's inline CSS or JavaScript (kept in files beside this module)."""
    return importlib.resources.files("ktrdr_run").joinpath(name).read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def downsample_indices(values: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Sorted indices of at most ``max_points`` values that keep the shape of the series:
    the first, the last, and the min and the max of each of ``(max_points - 2) // 2``
    equal buckets. All indices when there are no more than ``max_points`` values."""
    n = int(values.shape[0])
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, (max_points - 2) // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    keep = [0, n - 1]
    for start, stop in itertools.pairwise(edges):
        chunk = values[start:stop]
        if np.isfinite(chunk).any():
            keep += [start + int(np.nanargmin(chunk)), start + int(np.nanargmax(chunk))]
    return np.unique(np.asarray(keep, dtype=np.int64))


@dataclass(frozen=True, slots=True)
class _Frame:
    """Bar index and value to SVG coordinates for one chart."""

    height: float
    bars: int
    vmin: float
    vmax: float

    @property
    def bottom(self) -> float:
        return self.height - _BOTTOM

    def x(self, index: np.ndarray | float) -> np.ndarray:
        if self.bars < 2:
            return np.full(np.shape(index), (_LEFT + _RIGHT) / 2)
        return _LEFT + np.asarray(index, dtype=np.float64) / (self.bars - 1) * (_RIGHT - _LEFT)

    def y(self, value: np.ndarray | float) -> np.ndarray:
        if not self.vmax > self.vmin:
            return np.full(np.shape(value), (_TOP + self.bottom) / 2)
        span = self.bottom - _TOP
        return _TOP + (self.vmax - np.asarray(value, dtype=np.float64)) / (self.vmax - self.vmin) * span

    def svg_open(self, chart_id: str, label: str) -> str:
        return (
            f'<svg class="chart" id="{chart_id}" viewBox="0 0 {_WIDTH} {self.height:g}" role="img" '
            f'aria-label="{_e(label)}" data-bars="{self.bars}" data-x0="{_LEFT:g}" data-x1="{_RIGHT:g}" '
            f'data-y-top="{_TOP:g}" data-y-bottom="{self.bottom:g}" '
            f'data-vmin="{self.vmin!r}" data-vmax="{self.vmax!r}">'
        )


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks inside [lo, hi], about ``count`` of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def _tick_label(value: float) -> str:
    text = f"{value:,.2f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    return " ".join(f"{x:.2f},{y:.2f}" for x, y in zip(xs, ys, strict=True))


def _axes(frame: _Frame, ticks: list[float], labels: list[str], stamps: list[str]) -> str:
    """Horizontal grid lines with their value labels, and the date ticks under the plot."""
    parts = ['<g class="grid">']
    for tick, label in zip(ticks, labels, strict=True):
        y = float(frame.y(tick))
        parts.append(
            f'<line x1="{_LEFT:g}" x2="{_RIGHT:g}" y1="{y:.2f}" y2="{y:.2f}"/>'
            f'<text x="{_LEFT - 8:g}" y="{y + 4:.2f}" text-anchor="end">{_e(label)}</text>'
        )
    n = frame.bars
    marks = sorted({round(i) for i in np.linspace(0, n - 1, min(n, 6))})
    for k, index in enumerate(marks):
        x = float(frame.x(index))
        anchor = "middle" if 0 < k < len(marks) - 1 or len(marks) == 1 else ("start" if k == 0 else "end")
        parts.append(
            f'<line class="tick" x1="{x:.2f}" x2="{x:.2f}" y1="{frame.bottom:g}" y2="{frame.bottom + 5:g}"/>'
            f'<text x="{x:.2f}" y="{frame.bottom + 19:g}" text-anchor="{anchor}">{_e(stamps[index])}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{_LEFT:g}" x2="{_RIGHT:g}" y1="{frame.bottom:g}" y2="{frame.bottom:g}"/>'
    )
    parts.append("</g>")
    return "".join(parts)


def _crosshair(frame: _Frame) -> str:
    return f'<line class="crosshair" x1="{_LEFT:g}" x2="{_LEFT:g}" y1="{_TOP:g}" y2="{frame.bottom:g}"/>'


def _bar_index(stamps_ns: np.ndarray, times: pd.Series) -> np.ndarray:
    """The bar of each time (the first bar at or after it); -1 where the time is missing."""
    stamps = pd.DatetimeIndex(pd.to_datetime(times, utc=True)).as_unit("ns")
    index = np.clip(np.searchsorted(stamps_ns, stamps.asi8), 0, max(len(stamps_ns) - 1, 0))
    return np.where(stamps.isna(), -1, index)


def _utc(value: Any) -> pd.Timestamp:
    return pd.Timestamp(pd.to_datetime(value, utc=True))


def _units(value: Any) -> str:
    number = float(value)
    return f"{number:,.0f}" if number.is_integer() else f"{number:,.6g}"


def _money(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):,.2f}"


def _price(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):,.4f}"


def _is_open(trade: Mapping[str, Any]) -> bool:
    return bool(trade.get("is_open", False)) or pd.isna(trade.get("exit_time"))


def _markers(
    frame: _Frame, equity: np.ndarray, stamps_ns: np.ndarray, trades: pd.DataFrame, pattern: str
) -> str:
    """One ▲ under the curve per entry and one hollow ▽ over it per exit, coloured by side;
    none for the exit of a position still open."""
    if trades.empty:
        return ""
    entry_bar = _bar_index(stamps_ns, pd.Series(trades["entry_time"]))
    exit_bar = _bar_index(
        stamps_ns, pd.Series(trades.get("exit_time", pd.Series(pd.NaT, index=trades.index)))
    )
    parts = ['<g class="trades">']
    for row, trade in enumerate(trades.to_dict("records")):
        side = "short" if str(trade.get("side", "long")) == "short" else "long"
        number = row + 1
        for kind, bar in (("entry", int(entry_bar[row])), ("exit", int(exit_bar[row]))):
            if bar < 0 or (kind == "exit" and _is_open(trade)):
                continue
            stamp = _utc(trade[f"{kind}_time"])
            x, y = float(frame.x(bar)), float(frame.y(equity[bar]))
            if kind == "entry":
                d = f"M{x:.2f},{y + 2:.2f}L{x + 5:.2f},{y + 11:.2f}L{x - 5:.2f},{y + 11:.2f}Z"
                tip = (
                    f"#{number} {side} entry · {stamp.strftime(pattern)} · "
                    f"{_units(trade.get('units', 0))} @ {_price(trade.get('entry_price'))}"
                )
            else:
                d = f"M{x:.2f},{y - 2:.2f}L{x + 5:.2f},{y - 11:.2f}L{x - 5:.2f},{y - 11:.2f}Z"
                ret = trade.get("return_pct")
                ret_text = f" ({float(ret) * 100:+,.2f} %)" if ret is not None and not pd.isna(ret) else ""
                tip = (
                    f"#{number} {side} exit · {stamp.strftime(pattern)} @ {_price(trade.get('exit_price'))}"
                    f" · pnl {_money(trade.get('pnl'))}{ret_text}"
                )
            parts.append(
                f'<path class="trade-marker {kind} {side}" data-trade="{number}" '
                f'data-time="{_e(stamp.strftime(ISO_FORMAT))}" d="{d}"><title>{_e(tip)}</title></path>'
            )
    parts.append("</g>")
    return "".join(parts)


def _equity_svg(
    values: np.ndarray, labels: list[str], trades: pd.DataFrame, stamps_ns: np.ndarray, pattern: str
) -> str:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = (hi - lo) * 0.06 if hi > lo else max(abs(hi) * 0.01, 1.0)
    frame = _Frame(_EQUITY_HEIGHT, len(values), lo - pad, hi + pad)
    ticks = _nice_ticks(frame.vmin, frame.vmax)
    keep = downsample_indices(values)
    xs, ys = frame.x(keep), frame.y(values[keep])
    base_y = float(frame.y(values[0]))
    area = f"M{xs[0]:.2f},{frame.bottom:g}L{_points(xs, ys).replace(' ', 'L')}L{xs[-1]:.2f},{frame.bottom:g}Z"
    return "".join(
        [
            frame.svg_open("equity-chart", "Equity curve with trade entries and exits"),
            _axes(frame, ticks, [_tick_label(t) for t in ticks], labels),
            f'<line class="baseline" x1="{_LEFT:g}" x2="{_RIGHT:g}" y1="{base_y:.2f}" y2="{base_y:.2f}">'
            f"<title>start: {_e(_money(values[0]))}</title></line>",
            f'<path class="equity-area" d="{area}"/>',
            f'<polyline id="equity-line" class="equity-line" points="{_points(xs, ys)}"/>',
            _markers(frame, values, stamps_ns, trades, pattern),
            _crosshair(frame),
            "</svg>",
        ]
    )


def _drawdown_svg(drawdown: np.ndarray, labels: list[str]) -> str:
    """The drawdown in percent hanging from 0, its lowest point exactly at the plot bottom."""
    depth = -np.nan_to_num(drawdown, nan=0.0) * 100
    deepest = int(np.argmin(depth))
    floor = float(depth[deepest])
    frame = _Frame(_DRAWDOWN_HEIGHT, len(depth), floor if floor < 0 else -1.0, 0.0)
    ticks = _nice_ticks(frame.vmin, 0.0, 4)
    keep = downsample_indices(depth)
    xs, ys = frame.x(keep), frame.y(depth[keep])
    zero = float(frame.y(0.0))
    path = f"M{xs[0]:.2f},{zero:.2f}L{_points(xs, ys).replace(' ', 'L')}L{xs[-1]:.2f},{zero:.2f}Z"
    x, y = float(frame.x(deepest)), float(frame.y(floor))
    note = f"max drawdown {-floor:,.2f} % on {labels[deepest]}" if floor < 0 else "no drawdown"
    return "".join(
        [
            f'<p class="legend" id="max-drawdown">{_e(note)}</p>',
            frame.svg_open("drawdown-chart", "Drawdown in percent"),
            _axes(frame, ticks, [f"{_tick_label(t)} %" for t in ticks], labels),
            f'<path id="drawdown-path" class="drawdown" d="{path}"/>',
            f'<circle class="deepest" cx="{x:.2f}" cy="{y:.2f}" r="3.5"><title>{_e(note)}</title></circle>',
            _crosshair(frame),
            "</svg>",
        ]
    )


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, list | tuple):
        return json.dumps(value)
    return str(value)


def _param_rows(record: OpRecord, result: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, value, given) for every job param: those submitted, then the defaults the
    op resolved (the strategy's params and the engine settings) that were not given."""
    given = dict(_flatten(record.params or {}))
    rows = [(name, _param_text(value), True) for name, value in given.items()]
    strategy = result.get("strategy")
    resolved: dict[str, Any] = {}
    if isinstance(strategy, Mapping):
        resolved.update(_flatten(strategy.get("params") or {}, "strategy_params."))
    resolved.update(_flatten(result.get("settings") or {}))
    rows += [(name, _param_text(value), False) for name, value in resolved.items() if name not in given]
    return rows


def _metric_label(name: str) -> str:
    text = name.replace("_pct", " %").replace("_", " ")
    return text[:1].upper() + text[1:]


def _metric_class(name: str, value: Any) -> str:
    if name not in SIGNED_METRICS or not isinstance(value, int | float) or isinstance(value, bool):
        return "num"
    return "num pos" if value > 0 else ("num neg" if value < 0 else "num")


def _trade_table(trades: pd.DataFrame, pattern: str) -> str:
    if trades.empty:
        return '<p class="muted">No trades.</p>'
    shown = trades.head(MAX_TRADE_ROWS)
    total = len(trades)
    still_open = sum(_is_open(trade) for trade in trades.to_dict("records"))
    count = f"{total:,} trade{'s' if total != 1 else ''}" + (
        f", {still_open} still open" if still_open else ""
    )
    shown_text = f"The first {len(shown)} of {count}." if total > len(shown) else f"{count}."
    note = f'<p class="muted">{_e(shown_text)}</p>'
    head = (
        "<tr><th>#</th><th>Side</th><th>Entry</th><th>Exit</th><th class=num>Units</th>"
        "<th class=num>Entry price</th><th class=num>Exit price</th><th class=num>P&amp;L</th>"
        "<th class=num>Return</th><th class=num>Bars</th></tr>"
    )
    rows = []
    for number, trade in enumerate(shown.to_dict("records"), start=1):
        side = "short" if str(trade.get("side", "long")) == "short" else "long"
        is_open = _is_open(trade)
        exit_time = trade.get("exit_time")
        exit_text = "" if pd.isna(exit_time) else _utc(exit_time).strftime(pattern)
        if is_open:
            exit_text = f'<span class="badge">open</span> {_e(exit_text)}'
        else:
            exit_text = _e(exit_text)
        pnl = trade.get("pnl")
        pnl_class = (
            "num" if pnl is None or pd.isna(pnl) or pnl == 0 else ("num pos" if pnl > 0 else "num neg")
        )
        ret = trade.get("return_pct")
        ret_text = "" if ret is None or pd.isna(ret) else f"{float(ret) * 100:+,.2f} %"
        bars = trade.get("holding_bars")
        rows.append(
            f'<tr class="trade {side}{" open" if is_open else ""}"><td>{number}</td>'
            f'<td><span class="side {side}">{side}</span></td>'
            f"<td>{_e(_utc(trade['entry_time']).strftime(pattern))}</td><td>{exit_text}</td>"
            f"<td class=num>{_e(_units(trade.get('units', 0)))}</td>"
            f"<td class=num>{_e(_price(trade.get('entry_price')))}</td>"
            f"<td class=num>{_e(_price(trade.get('exit_price')))}</td>"
            f'<td class="{pnl_class}">{_e(_money(pnl))}</td><td class="{pnl_class}">{_e(ret_text)}</td>'
            f"<td class=num>{'' if bars is None or pd.isna(bars) else _e(f'{int(bars):,}')}</td></tr>"
        )
    table = f'<table class="trades"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    return f'{note}<div class="scroll">{table}</div>'


def _hover_json(values: np.ndarray, drawdown: np.ndarray, labels: list[str]) -> str:
    """The crosshair's data: x, date, equity and drawdown of the drawn points, as JSON safe
    inside a <script> element."""
    frame_x = _Frame(_EQUITY_HEIGHT, len(values), 0.0, 1.0)
    keep = downsample_indices(values)
    data = {
        "x": [round(float(x), 2) for x in frame_x.x(keep)],
        "t": [labels[i] for i in keep],
        "e": [_money(values[i]) for i in keep],
        "d": [f"{-float(drawdown[i]) * 100 + 0.0:,.2f} %" for i in keep],
    }
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _header(record: OpRecord, result: Mapping[str, Any], title: str, labels: list[str]) -> str:
    period = result.get("period") or {}
    facts = [f"op <code>{_e(record.op_id)}</code>"]
    if labels:
        facts.append(f"{_e(labels[0])} → {_e(labels[-1])}")
    elif period:
        facts.append(f"{_e(period.get('first_bar', ''))} → {_e(period.get('last_bar', ''))}")
    if result.get("bars") is not None:
        facts.append(f"{int(result['bars']):,} bars")
    if result.get("data_source"):
        facts.append(_e(result["data_source"]))
    warn = (
        '<p class="warn">These are generated demo bars, not market data.</p>'
        if result.get("synthetic_data")
        else ""
    )
    return f'<header><h1>{_e(title)}</h1><p class="sub">Backtest {" · ".join(facts)}</p>{warn}</header>'


def _kpis(metrics: Mapping[str, Any]) -> str:
    cards = [
        f'<div class="kpi" data-metric="{_e(name)}"><div class="label">{_e(_metric_label(name))}</div>'
        f'<div class="value {_metric_class(name, metrics[name])}">{_e(format_metric(name, metrics[name]))}'
        "</div></div>"
        for name in KPI_METRICS
        if name in metrics
    ]
    return f'<section class="kpis">{"".join(cards)}</section>' if cards else ""


def _tables(record: OpRecord, result: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The metrics and the params, side by side."""
    metric_rows = "".join(
        f'<tr data-metric="{_e(name)}"><th>{_e(_metric_label(name))}</th>'
        f'<td class="{_metric_class(name, value)}">{_e(format_metric(name, value))}</td></tr>'
        for name, value in metrics.items()
    )
    param_rows = "".join(
        f'<tr data-param="{_e(name)}"{"" if given else " class=default"}><th>{_e(name)}</th>'
        f"<td>{_e(text)}{'' if given else ' <span class=muted>(default)</span>'}</td></tr>"
        for name, text, given in _param_rows(record, result)
    )
    return (
        '<div class="two"><section class="card"><h2>Metrics</h2>'
        f'<table class="metrics"><tbody>{metric_rows}</tbody></table></section>'
        '<section class="card"><h2>Parameters</h2>'
        f'<table class="params"><tbody>{param_rows}</tbody></table></section></div>'
    )


def _footer(record: OpRecord) -> str:
    lines = [f"ktrdr-run backtest report · op {record.op_id}"]
    if record.image:
        lines.append(f"image {record.image}")
    lines += [f"{name} {digest}" for name, digest in (record.artifacts or {}).items()]
    return f"<footer>{'<br>'.join(_e(line) for line in lines)}</footer>"


def backtest_report_html(record: OpRecord, equity: pd.DataFrame, trades: pd.DataFrame) -> str:
    """The report of one completed backtest as a self-contained HTML document.

    ``equity`` and ``trades`` are the op's ``equity_curve`` and ``trades`` artifacts read
    into DataFrames; ``record`` is its OpRecord (``result`` holds the metrics, strategy,
    symbol, timeframe and period; ``params`` the job params). Every text is escaped.
    """
    result: Mapping[str, Any] = record.result or {}
    strategy = result.get("strategy")
    if isinstance(strategy, Mapping):
        label = str(strategy.get("label") or strategy.get("name") or "")
    else:
        label = str(strategy or record.params.get("strategy", ""))
    symbol = result.get("symbol") or record.params.get("symbol", "")
    timeframe = result.get("timeframe") or record.params.get("timeframe", "")
    title = f"{label} · {symbol} {timeframe}".strip()
    metrics: Mapping[str, Any] = result.get("metrics") or {}

    values = equity["equity"].to_numpy(dtype=np.float64) if len(equity) else np.zeros(0)
    stamps = pd.DatetimeIndex(equity["timestamp"] if len(equity) else [], tz="UTC")
    pattern = time_format(stamps)
    labels = [stamp.strftime(pattern) for stamp in stamps]
    drawdown = drawdown_series(equity)

    if values.size and np.isfinite(values).any():
        charts = (
            '<section class="card"><h2>Equity</h2><p class="legend">'
            '<span class="long">▲ long entry</span><span class="long">▽ long exit</span>'
            '<span class="short">▲ short entry</span><span class="short">▽ short exit</span>'
            "<span>- - - starting equity</span></p>"
            f"{_equity_svg(values, labels, trades, stamps.as_unit('ns').asi8, pattern)}</section>"
            f'<section class="card"><h2>Drawdown</h2>{_drawdown_svg(drawdown, labels)}</section>'
            '<div id="tooltip" hidden></div>'
            '<script type="application/json" id="hover-data">'
            f"{_hover_json(values, drawdown, labels)}</script>"
        )
    else:
        charts = '<section class="card"><h2>Equity</h2><p class="muted">No equity data.</p></section>'
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Backtest {_e(title)} · {_e(record.op_id)}</title>",
            f"<style>{_asset('report.css')}</style></head><body><main>",
            _header(record, result, title, labels),
            _kpis(metrics),
            charts,
            _tables(record, result, metrics),
            f'<section class="card"><h2>Trades</h2>{_trade_table(trades, pattern)}</section>',
            _footer(record),
            f"</main><script>{_asset('report.js')}</script></body></html>",
        ]
    )


def write_backtest_report(
    path: str | Path, record: OpRecord, equity: pd.DataFrame, trades: pd.DataFrame
) -> Path:
    """Write :func:`backtest_report_html` to ``path`` (UTF-8, parent folders created) and
    return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(backtest_report_html(record, equity, trades), encoding="utf-8")
    return target
