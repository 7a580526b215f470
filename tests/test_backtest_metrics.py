"""Metrics against values computed independently: by hand, and from backtesting.py's run.

For the real-data cases the expected values are computed here, with numpy and the
standard library, from backtesting.py's own equity curve and trade list (an independent
simulation of the same target positions), following the definitions in docs/backtest.md;
where backtesting.py reports a metric with the same definition, its figure is checked too.
Nothing expected is taken from the engine's output.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from runner.backtest.data import Bars
from runner.backtest.engine import EngineConfig, simulate
from runner.backtest.metrics import METRIC_NAMES, compute_metrics, equity_metrics, periods_per_year
from runner.backtest.strategies import get_strategy

REL = 1e-6

KTRDR_NAMES = [
    "total_return", "total_return_pct", "annualized_return", "volatility", "sharpe_ratio",
    "sortino_ratio", "calmar_ratio", "max_drawdown", "max_drawdown_pct", "total_trades",
    "winning_trades", "losing_trades", "win_rate", "profit_factor", "avg_win", "avg_loss",
    "largest_win", "largest_loss", "avg_holding_period", "exposure_pct", "final_equity",
    "buy_and_hold_return_pct", "recovery_factor", "commissions_paid",
]  # fmt: skip


def _frame(opens: list[float], closes: list[float], freq: str = "D") -> pd.DataFrame:
    index = pd.date_range("2024-01-01", periods=len(opens), freq=freq, tz="UTC")
    return pd.DataFrame(
        {
            "open": opens,
            "high": np.maximum(opens, closes),
            "low": np.minimum(opens, closes),
            "close": closes,
            "volume": 1.0,
        },
        index=index,
    )


def test_metric_names_are_ktrdrs() -> None:
    assert list(METRIC_NAMES) == KTRDR_NAMES


def test_equity_metrics_by_hand() -> None:
    eq = [100.0, 110.0, 99.0, 121.0]
    m = equity_metrics(np.array(eq), 100.0, 252.0)
    r = [0.1, -0.1, 121 / 99 - 1]
    assert m["total_return"] == pytest.approx(21.0)
    assert m["total_return_pct"] == pytest.approx(0.21)
    assert m["final_equity"] == 121.0
    assert m["annualized_return"] == pytest.approx(1.21 ** (252 / 3) - 1)
    assert m["volatility"] == pytest.approx(statistics.stdev(r) * math.sqrt(252))
    assert m["sharpe_ratio"] == pytest.approx(statistics.mean(r) / statistics.stdev(r) * math.sqrt(252))
    downside = math.sqrt((0 + 0.01 + 0) / 3)
    assert m["sortino_ratio"] == pytest.approx(statistics.mean(r) / downside * math.sqrt(252))
    assert m["max_drawdown"] == pytest.approx(11.0)
    assert m["max_drawdown_pct"] == pytest.approx(0.1)
    assert m["calmar_ratio"] == pytest.approx((1.21 ** (252 / 3) - 1) / 0.1)
    assert m["recovery_factor"] == pytest.approx(21 / 11)


def test_flat_backtest_has_defined_zeros_and_nones() -> None:
    bars = Bars.from_frame(_frame([10.0] * 5, [10.0, 11.0, 12.0, 11.0, 13.0]))
    m = compute_metrics(simulate(bars, np.zeros(5, dtype=np.int8)))
    assert m["total_trades"] == 0 and m["win_rate"] == 0.0 and m["avg_win"] == 0.0
    assert m["volatility"] == 0.0 and m["max_drawdown"] == 0.0
    assert m["sharpe_ratio"] is None and m["sortino_ratio"] is None
    assert m["profit_factor"] is None and m["calmar_ratio"] is None
    assert m["recovery_factor"] is None
    assert m["buy_and_hold_return_pct"] == pytest.approx(0.3)
    assert m["exposure_pct"] == 0.0 and m["commissions_paid"] == 0.0


def test_trade_metrics_by_hand() -> None:
    # long bar1@11 -> bar3@13 (win), short bar3@13 -> bar5@15 (loss), long bar5 open at end
    opens = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    bars = Bars.from_frame(_frame(opens, [o + 0.5 for o in opens], freq="h"))
    target = np.array([1, 1, -1, -1, 1, 1, 1])
    cfg = EngineConfig(initial_capital=1000, commission=0.0, slippage=0.0)
    m = compute_metrics(simulate(bars, target, cfg))
    win = 90 * (13 - 11)  # 1000 // 11 = 90 units
    cash = 1000 - 990 + 90 * 13
    short_units = cash // 13
    loss = -short_units * (15 - 13)
    assert m["total_trades"] == 2 and m["winning_trades"] == 1 and m["losing_trades"] == 1
    assert m["win_rate"] == 0.5
    assert m["avg_win"] == pytest.approx(win) and m["largest_win"] == pytest.approx(win)
    assert m["avg_loss"] == pytest.approx(loss) and m["largest_loss"] == pytest.approx(loss)
    assert m["profit_factor"] == pytest.approx(win / -loss)
    assert m["avg_holding_period"] == pytest.approx(2.0)  # hours, hourly bars
    assert m["exposure_pct"] == pytest.approx(6 / 7)  # held on bars 1..6


def test_periods_per_year_follows_bar_spacing() -> None:
    days = pd.bdate_range("2020-01-01", periods=300).as_unit("ns").to_numpy()
    assert periods_per_year(days) == 252
    crypto = pd.date_range("2020-01-01", periods=300, freq="D").as_unit("ns").to_numpy()
    assert periods_per_year(crypto) == 365
    hours = pd.date_range("2020-01-06", periods=24 * 5, freq="h").as_unit("ns").to_numpy()
    assert periods_per_year(hours) == 252 * 24
    weeks = pd.date_range("2020-01-03", periods=60, freq="W-FRI").as_unit("ns").to_numpy()
    assert periods_per_year(weeks) == 52


# --- real market data, against backtesting.py's independent run -------------------------

backtesting = pytest.importorskip("backtesting")
from backtesting import Backtest, Strategy  # noqa: E402
from backtesting.test import EURUSD, GOOG  # noqa: E402


def _peer(frame: pd.DataFrame, target: np.ndarray, commission: float) -> pd.Series:
    sig = target.tolist()

    class Follow(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            i = len(self.data) - 1
            if sig[i] == sig[i - 1]:
                return
            if self.position:
                self.position.close()
            if sig[i] > 0:
                self.buy()
            elif sig[i] < 0:
                self.sell()

    bt = Backtest(frame, Follow, cash=100_000, commission=commission, finalize_trades=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bt.run()


def _expected(stats: pd.Series, frame: pd.DataFrame, periods: float) -> dict[str, Any]:
    """Every metric from the peer's equity curve and trades, per docs/backtest.md."""
    eq = stats["_equity_curve"]["Equity"].to_numpy(dtype=float)
    trades = stats["_trades"]
    open_trades = list(stats["_strategy"].trades)
    n = eq.size
    initial = 100_000.0
    rets = np.diff(eq) / eq[:-1]
    mean, std = rets.mean(), rets.std(ddof=1)
    peak = np.maximum.accumulate(eq)
    dd_pct = ((peak - eq) / peak).max()
    dd = (peak - eq).max()
    ann = (eq[-1] / initial) ** (periods / (n - 1)) - 1
    pnl = trades["PnL"].to_numpy(dtype=float)
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    held = np.zeros(n, dtype=bool)
    for a, b in zip(trades["EntryBar"], trades["ExitBar"], strict=True):
        held[a:b] = True
    for t in open_trades:
        held[t.entry_bar :] = True
    hours = (trades["ExitTime"] - trades["EntryTime"]).dt.total_seconds() / 3600
    close = frame["Close"].to_numpy(dtype=float)
    return {
        "total_return": eq[-1] - initial,
        "total_return_pct": eq[-1] / initial - 1,
        "annualized_return": ann,
        "volatility": std * math.sqrt(periods),
        "sharpe_ratio": mean / std * math.sqrt(periods),
        "sortino_ratio": mean / math.sqrt(np.mean(np.minimum(rets, 0) ** 2)) * math.sqrt(periods),
        "calmar_ratio": ann / dd_pct,
        "max_drawdown": dd,
        "max_drawdown_pct": dd_pct,
        "total_trades": len(pnl),
        "winning_trades": len(wins),
        "losing_trades": len(losses),
        "win_rate": len(wins) / len(pnl),
        "profit_factor": wins.sum() / -losses.sum(),
        "avg_win": wins.mean(),
        "avg_loss": losses.mean(),
        "largest_win": wins.max(),
        "largest_loss": losses.min(),
        "avg_holding_period": float(hours.mean()),
        "exposure_pct": held.mean(),
        "final_equity": eq[-1],
        "buy_and_hold_return_pct": close[-1] / close[0] - 1,
        "recovery_factor": (eq[-1] - initial) / dd,
        "commissions_paid": trades["Commission"].sum()
        + sum(0.001 * abs(t.size) * t.entry_price for t in open_trades),
    }


@pytest.mark.parametrize(
    ("frame", "strategy", "params", "periods"),
    [
        (GOOG, "sma_cross", {"fast": 10, "slow": 30}, 252.0),
        (GOOG, "bollinger_reversion", {"period": 20, "k": 2.0}, 252.0),
        (EURUSD, "sma_cross", {"fast": 20, "slow": 50}, 252.0 * 24),
        (EURUSD, "donchian_breakout", {"lookback": 24}, 252.0 * 24),
    ],
    ids=["GOOG-sma", "GOOG-bollinger", "EURUSD-sma", "EURUSD-donchian"],
)
def test_metrics_match_independent_computation_on_real_data(
    frame: pd.DataFrame, strategy: str, params: dict[str, Any], periods: float
) -> None:
    bars = Bars.from_frame(frame.rename(columns=str.lower))
    assert periods_per_year(bars.timestamps) == periods  # daily 252; 24 h forex bars 252*24
    spec = get_strategy(strategy)
    target = spec.positions(bars, spec.parse_params(params), False)
    result = simulate(bars, target, EngineConfig(commission=0.001, slippage=0.0))
    ours = compute_metrics(result)
    stats = _peer(frame, target, 0.001)
    want = _expected(stats, frame, periods)
    assert set(ours) == set(KTRDR_NAMES)
    for name in KTRDR_NAMES:
        assert ours[name] == pytest.approx(want[name], rel=REL, abs=1e-9), name
    # Where backtesting.py's own definition is the same, its figures agree too.
    pct = {k: 100 * float(v) for k, v in ours.items() if v is not None}
    assert pct["total_return_pct"] == pytest.approx(stats["Return [%]"], rel=REL)
    assert pct["max_drawdown_pct"] == pytest.approx(-stats["Max. Drawdown [%]"], rel=REL)
    assert pct["win_rate"] == pytest.approx(stats["Win Rate [%]"], rel=REL)
    assert pct["buy_and_hold_return_pct"] == pytest.approx(stats["Buy & Hold Return [%]"], rel=REL)
    assert ours["total_trades"] == stats["# Trades"]
    assert ours["final_equity"] == pytest.approx(stats["Equity Final [$]"], rel=REL)
