"""Terminal charts: widths, and the drawn shape checked against values computed here."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.cells import cell_len

from ktrdr_run.charts import backtest_chart, backtest_chart_text, line_chart, sparkline
from runner.backtest.data import bars_from_frame
from runner.backtest.demo import generate_demo_bars
from runner.backtest.engine import EngineConfig, simulate
from runner.backtest.strategies import get_strategy
from runner.ops.backtest import equity_table

# Unicode braille: bit k of (codepoint - 0x2800) is dot k+1; dots 1-3 and 7 are the left
# column top to bottom, dots 4-6 and 8 the right column.
DOT_POSITION = {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (0, 1), 4: (1, 1), 5: (2, 1), 6: (3, 0), 7: (3, 1)}


def _is_braille(char: str) -> bool:
    return 0x2800 <= ord(char) <= 0x28FF


def _plot_start(lines: list[str]) -> int:
    """Where the braille plot begins; the same on every line of a chart."""
    starts = {next(i for i, c in enumerate(line) if _is_braille(c)) for line in lines}
    assert len(starts) == 1, starts
    return starts.pop()


def _dots(lines: list[str]) -> np.ndarray:
    """The dot grid of a chart's plot area: [dot row from the top, dot column]."""
    start = _plot_start(lines)
    plot = [line[start:] for line in lines]
    assert all(_is_braille(c) for row in plot for c in row)
    width = len(plot[0])
    grid = np.zeros((4 * len(plot), 2 * width), dtype=bool)
    for r, row in enumerate(plot):
        for c, char in enumerate(row):
            bits = ord(char) - 0x2800
            for bit, (dy, dx) in DOT_POSITION.items():
                if bits >> bit & 1:
                    grid[4 * r + dy, 2 * c + dx] = True
    return grid


def _label_value(line: str) -> float:
    label = line[: _plot_start([line])].rstrip("┤│ ").strip()
    return float(label.replace(",", "").replace("%", ""))


@pytest.fixture(scope="module")
def equity() -> pd.DataFrame:
    """The equity curve of sma_cross on the generated DEMO bars, as the op stores it."""
    strategy = get_strategy("sma_cross")
    params = strategy.parse_params({})
    bars = bars_from_frame(generate_demo_bars("1d"), "DEMO_1d.csv", warmup=strategy.warmup(params))
    result = simulate(bars, strategy.positions(bars, params, False), EngineConfig())
    return pd.read_parquet(io.BytesIO(equity_table(result)))


def _frame(values: np.ndarray, with_drawdown: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "timestamp": pd.date_range("2020-01-01", periods=len(values), freq="D", tz="UTC"),
            "equity": values,
        }
    )
    if with_drawdown:
        peak = np.maximum.accumulate(values)
        frame["drawdown_pct"] = (peak - values) / peak
    return frame


def _blocks(lines: list[str]) -> tuple[list[str], list[str]]:
    """The equity and the drawdown chart rows of a backtest_chart."""
    dd_title = next(i for i, line in enumerate(lines) if line.startswith("Drawdown"))
    equity_rows = [line for line in lines[1:dd_title]]
    drawdown_rows = [line for line in lines[dd_title + 1 :] if any(_is_braille(c) for c in line)]
    return equity_rows, drawdown_rows


@pytest.mark.parametrize("width", [80, 60])
def test_every_line_fits(equity: pd.DataFrame, width: int) -> None:
    lines = backtest_chart(equity, width=width)
    assert all(cell_len(line) <= width for line in lines), [cell_len(line) for line in lines]
    equity_rows, drawdown_rows = _blocks(lines)
    assert (len(equity_rows), len(drawdown_rows)) == (10, 5)
    assert all(cell_len(line) == width for line in equity_rows + drawdown_rows)
    assert lines[-1].split() == ["2015-01-02", "2024-08-29"]
    # The dates start under the plot's first column and end under its last.
    start = _plot_start(equity_rows)
    assert lines[-1].index("2015-01-02") == start and len(lines[-1]) == width
    assert backtest_chart_text(equity, width=width).plain.split("\n") == lines


def test_line_chart_is_exactly_width() -> None:
    for width in (20, 61, 80):
        lines = line_chart(np.sin(np.arange(500) / 20), width=width, height=6)
        assert len(lines) == 6 and {cell_len(line) for line in lines} == {width}


def test_rising_series_goes_from_bottom_left_to_top_right() -> None:
    lines = line_chart(np.arange(300, dtype=float), width=50, height=8)
    dots = _dots(lines)
    rows, cols = dots.shape
    bottom_cols, top_cols = np.flatnonzero(dots[rows - 1]), np.flatnonzero(dots[0])
    assert bottom_cols.min() == 0 and bottom_cols.max() < cols // 10, "bottom dot in the first column"
    assert top_cols.max() == cols - 1 and top_cols.min() > cols * 9 // 10, "top dot in the last column"
    assert dots.any(axis=0).all(), "no gaps"
    top_per_column = [int(np.argmax(dots[:, c])) for c in range(cols)]  # first dot from the top
    assert top_per_column == sorted(top_per_column, reverse=True)
    assert _label_value(lines[0]) == 299 and _label_value(lines[-1]) == 0


def test_few_values_are_stretched_and_keep_their_peak() -> None:
    values = [1.0, 5.0, 2.0, 8.0, 3.0]
    dots = _dots(line_chart(values, width=45, height=5))
    cols = dots.shape[1]
    peak_col = round(3 * (cols - 1) / (len(values) - 1))
    top_cols = np.flatnonzero(dots[0])
    assert peak_col in top_cols and abs(top_cols - peak_col).max() <= 1
    assert dots[dots.shape[0] - 1, 0], "the first value is the minimum"


@pytest.mark.parametrize("with_drawdown", [True, False])
def test_deepest_drawdown_column_is_where_the_dip_is(with_drawdown: bool) -> None:
    n = 400
    values = np.linspace(100.0, 200.0, n)
    values[287] *= 0.55  # one deep dip, one bar long
    values[100:110] *= 0.9  # and a shallower one
    lines = backtest_chart(_frame(values, with_drawdown), width=80)
    _, drawdown_rows = _blocks(lines)
    dots = _dots(drawdown_rows)
    peak = np.maximum.accumulate(values)
    deepest = int(np.argmax((peak - values) / peak))
    expected_col = deepest * dots.shape[1] // n
    lowest = int(np.flatnonzero(dots.any(axis=1)).max())
    assert lowest == dots.shape[0] - 1
    assert np.flatnonzero(dots[lowest]).tolist() == [expected_col]
    max_dd = ((peak - values) / peak).max() * 100
    assert _label_value(drawdown_rows[-1]) == pytest.approx(-max_dd, abs=0.005)
    assert _label_value(drawdown_rows[0]) == 0


def test_demo_drawdown_deepest_column_matches_numpy(equity: pd.DataFrame) -> None:
    _, drawdown_rows = _blocks(backtest_chart(equity, width=80))
    dots = _dots(drawdown_rows)
    eq = equity["equity"].to_numpy()
    peak = np.maximum.accumulate(eq)
    deepest = int(np.argmax((peak - eq) / peak))
    lowest = int(np.flatnonzero(dots.any(axis=1)).max())
    assert lowest == dots.shape[0] - 1
    assert deepest * dots.shape[1] // len(eq) in np.flatnonzero(dots[lowest])


def test_labels_show_the_true_min_and_max(equity: pd.DataFrame) -> None:
    values = 1000 + np.cumsum(np.random.default_rng(7).standard_normal(900)) * 3
    lines = line_chart(values, width=70, height=7)
    assert _label_value(lines[0]) == pytest.approx(values.max(), abs=0.5)
    assert _label_value(lines[-1]) == pytest.approx(values.min(), abs=0.5)
    small = line_chart(values / 100, width=70, height=7)
    assert _label_value(small[0]) == pytest.approx(values.max() / 100, abs=0.005)
    equity_rows, _ = _blocks(backtest_chart(equity, width=80))
    assert _label_value(equity_rows[0]) == pytest.approx(equity["equity"].max(), abs=0.5)
    assert _label_value(equity_rows[-1]) == pytest.approx(equity["equity"].min(), abs=0.5)


def test_one_bar(equity: pd.DataFrame) -> None:
    lines = backtest_chart(equity.iloc[:1], width=60)
    assert all(cell_len(line) <= 60 for line in lines)
    assert lines[-1].split() == ["2015-01-02"]
    equity_rows, drawdown_rows = _blocks(lines)
    assert _dots(equity_rows).any() and _dots(drawdown_rows)[0].all()


def test_constant_equity() -> None:
    lines = backtest_chart(_frame(np.full(250, 50_000.0)), width=60)
    assert all(cell_len(line) <= 60 for line in lines)
    equity_rows, drawdown_rows = _blocks(lines)
    eq_dots = _dots(equity_rows)
    assert np.flatnonzero(eq_dots.any(axis=1)).size == 1 and eq_dots.any(axis=0).all()
    dd_dots = _dots(drawdown_rows)
    assert dd_dots[0].all() and not dd_dots[1:].any(), "no drawdown: only the zero line"
    assert "-0.00" not in "\n".join(lines)


def test_intraday_dates_show_the_time() -> None:
    frame = _frame(np.linspace(1.0, 2.0, 50))
    frame["timestamp"] = pd.date_range("2024-03-01 09:30", periods=50, freq="5min", tz="UTC")
    assert backtest_chart(frame, width=80)[-1].split() == ["2024-03-01", "09:30", "2024-03-01", "13:35"]


def test_too_narrow_is_an_error(equity: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="width"):
        backtest_chart(equity, width=10)
    with pytest.raises(ValueError, match="width"):
        line_chart([1.0, 2.0], width=5, height=3)


def test_sparkline() -> None:
    assert sparkline(range(8), 20) == "▁▂▃▄▅▆▇█"
    rising = sparkline(np.arange(1000.0), 30)
    assert len(rising) == 30 and rising[0] == "▁" and rising[-1] == "█"
    assert list(rising) == sorted(rising)
    assert sparkline([5.0] * 10, 4) == "▄▄▄▄"
    assert sparkline([], 10) == "" and sparkline([1.0, 2.0], 0) == ""
    assert sparkline([1.0, float("nan"), 3.0], 10) == "▁ █"
