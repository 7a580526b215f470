"""The engine and the strategies against independent implementations, on real market data.

Independent means: nothing here imports the engine's or the strategies' helpers to build
the expected values. The expected signals come from plain per-bar Python loops written
from the definitions in docs/backtest.md; the expected trades come from (a) a plain
per-bar Python simulation written here and (b) backtesting.py (test-only dependency,
AGPL, never imported by runner/) configured to the same semantics. Real data: the daily
GOOG and hourly EURUSD bars that ship with backtesting.py.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from runner.backtest.data import Bars
from runner.backtest.engine import EngineConfig, simulate
from runner.backtest.strategies import get_strategy, strategy_names

backtesting = pytest.importorskip("backtesting")
from backtesting import Backtest, Strategy  # noqa: E402
from backtesting.test import EURUSD, GOOG  # noqa: E402

REL = 1e-6

# --- real market data -------------------------------------------------------------------


def _bars(frame: pd.DataFrame, name: str) -> Bars:
    lower = frame.rename(columns=str.lower)
    return Bars.from_frame(lower, source=name)


DATASETS: dict[str, Bars] = {"GOOG_1d": _bars(GOOG, "GOOG"), "EURUSD_1h": _bars(EURUSD, "EURUSD")}
PEER_FRAMES: dict[str, pd.DataFrame] = {"GOOG_1d": GOOG, "EURUSD_1h": EURUSD}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("sma_cross", {"fast": 10, "slow": 30}),
    ("sma_cross", {"fast": 20, "slow": 50}),
    ("rsi_reversion", {"period": 14, "lower": 30, "upper": 70}),
    ("donchian_breakout", {"lookback": 20}),
    ("bollinger_reversion", {"period": 20, "k": 2.0}),
]

# --- reference signals: per-bar loops from the written definitions ----------------------


def ref_sma(close: list[float], window: int) -> list[float]:
    """Simple moving average; NaN until ``window`` closes exist."""
    return [
        sum(close[t - window + 1 : t + 1]) / window if t >= window - 1 else math.nan
        for t in range(len(close))
    ]


def ref_sma_cross(bars: Bars, fast: int, slow: int, long_only: bool) -> list[int]:
    close = bars.close.tolist()
    f, s = ref_sma(close, fast), ref_sma(close, slow)
    out, pos = [], 0
    for t in range(len(close)):
        if t - 1 >= slow - 1:  # both averages exist on the bar before
            if f[t - 1] <= s[t - 1] and f[t] > s[t]:
                pos = 1
            elif f[t - 1] >= s[t - 1] and f[t] < s[t]:
                pos = -1
        out.append(pos)
    return [max(p, 0) if long_only else p for p in out]


def ref_rsi(close: list[float], period: int) -> list[float]:
    """Wilder's RSI; NaN for the first ``period`` bars."""
    rsi = [math.nan] * len(close)
    gains = [max(close[t] - close[t - 1], 0.0) for t in range(1, len(close))]
    losses = [max(close[t - 1] - close[t], 0.0) for t in range(1, len(close))]
    if len(close) <= period:
        return rsi
    g = sum(gains[:period]) / period
    l_ = sum(losses[:period]) / period
    for t in range(period, len(close)):
        if t > period:
            g = (g * (period - 1) + gains[t - 1]) / period
            l_ = (l_ * (period - 1) + losses[t - 1]) / period
        rsi[t] = 100.0 * g / (g + l_) if g + l_ > 0 else 50.0
    return rsi


def ref_rsi_reversion(bars: Bars, period: int, lower: float, upper: float, long_only: bool) -> list[int]:
    rsi = ref_rsi(bars.close.tolist(), period)
    out, pos = [], 0
    for t, value in enumerate(rsi):
        if t >= period:
            if value < lower:
                pos = 1
            elif value > upper:
                pos = -1
        out.append(max(pos, 0) if long_only else pos)
    return out


def ref_donchian(bars: Bars, lookback: int, long_only: bool) -> list[int]:
    high, low, close = bars.high.tolist(), bars.low.tolist(), bars.close.tolist()
    out, pos = [], 0
    for t in range(len(close)):
        if t >= lookback:
            if close[t] > max(high[t - lookback : t]):
                pos = 1
            elif close[t] < min(low[t - lookback : t]):
                pos = -1
        out.append(max(pos, 0) if long_only else pos)
    return out


def ref_bollinger(bars: Bars, period: int, k: float, long_only: bool) -> list[int]:
    close = bars.close.tolist()
    out, pos = [], 0
    for t in range(len(close)):
        if t >= period - 1:
            window = close[t - period + 1 : t + 1]
            mid = sum(window) / period
            sd = math.sqrt(sum((x - mid) ** 2 for x in window) / period)
            c = close[t]
            if pos == 1 and c >= mid:
                pos = 0
            elif pos == -1 and c <= mid:
                pos = 0
            if c < mid - k * sd:
                pos = 1
            elif c > mid + k * sd:
                pos = -1
        out.append(max(pos, 0) if long_only else pos)
    return out


def ref_signals(name: str, bars: Bars, params: dict[str, Any], long_only: bool) -> list[int]:
    if name == "sma_cross":
        return ref_sma_cross(bars, params["fast"], params["slow"], long_only)
    if name == "rsi_reversion":
        return ref_rsi_reversion(bars, params["period"], params["lower"], params["upper"], long_only)
    if name == "donchian_breakout":
        return ref_donchian(bars, params["lookback"], long_only)
    if name == "bollinger_reversion":
        return ref_bollinger(bars, params["period"], params["k"], long_only)
    raise AssertionError(name)


# --- reference simulation: a plain per-bar loop -----------------------------------------


def ref_simulate(
    bars: Bars,
    signals: list[int],
    *,
    capital: float,
    commission: float,
    slippage: float,
    fraction: float | None = None,
    close_at_end: bool = False,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Trades and per-bar equity; decide on close t, fill at open t+1."""
    opens, closes = bars.open.tolist(), bars.close.tolist()
    cash, units = capital, 0
    trades: list[dict[str, Any]] = []
    equity: list[float] = []
    current: dict[str, Any] = {}
    for t in range(len(closes)):
        if t > 0 and signals[t - 1] != (signals[t - 2] if t >= 2 else 0):
            want = signals[t - 1]
            if units != 0:
                side = 1 if units > 0 else -1
                price = opens[t] * (1 - slippage) if side > 0 else opens[t] * (1 + slippage)
                fee = commission * abs(units) * price
                if side > 0:
                    cash += abs(units) * price - fee
                else:
                    cash -= abs(units) * price + fee
                current.update(exit_bar=t, exit_price=price, exit_fee=fee)
                trades.append(current)
                units, current = 0, {}
            if want != 0:
                price = opens[t] * (1 + slippage) if want > 0 else opens[t] * (1 - slippage)
                budget = cash * (fraction if fraction is not None else 1.0)
                size = int(budget // (price * (1 + commission)))
                if size >= 1:
                    fee = commission * size * price
                    if want > 0:
                        cash -= size * price + fee
                    else:
                        cash += size * price - fee
                    units = size * want
                    current = {
                        "entry_bar": t,
                        "direction": want,
                        "units": size,
                        "entry_price": price,
                        "entry_fee": fee,
                    }
        equity.append(cash + units * closes[t])
        if equity[-1] <= 0:  # ruin: close at this close, nothing more
            if units != 0:
                side = 1 if units > 0 else -1
                price = closes[t] * (1 - slippage) if side > 0 else closes[t] * (1 + slippage)
                fee = commission * abs(units) * price
                current.update(exit_bar=t, exit_price=price, exit_fee=fee)
                trades.append(current)
                units = 0
            equity[-1:] = [0.0] * (len(closes) - t)
            break
    if units != 0 and close_at_end:
        side = 1 if units > 0 else -1
        last = len(closes) - 1
        price = closes[last] * (1 - slippage) if side > 0 else closes[last] * (1 + slippage)
        fee = commission * abs(units) * price
        cash += units * price - fee
        current.update(exit_bar=last, exit_price=price, exit_fee=fee)
        trades.append(current)
        equity[-1] = cash
    for tr in trades:
        tr["pnl"] = (
            tr["direction"] * tr["units"] * (tr["exit_price"] - tr["entry_price"])
            - tr["entry_fee"]
            - tr["exit_fee"]
        )
    return trades, equity


# --- backtesting.py configured to the same semantics ------------------------------------


def peer_run(
    frame: pd.DataFrame, signals: list[int], *, commission: float, fraction: float | None
) -> pd.Series:
    """backtesting.py acting on changes of ``signals`` (decided on bar i, filled at i+1)."""
    sig = list(signals)
    size = fraction if fraction is not None else 1 - 1e-12

    class Follow(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            i = len(self.data) - 1
            want, before = sig[i], sig[i - 1]
            if want == before:
                return
            if self.position:
                self.position.close()
            if want > 0:
                self.buy(size=size)
            elif want < 0:
                self.sell(size=size)

    bt = Backtest(
        frame,
        Follow,
        cash=100_000,
        commission=commission,
        spread=0.0,
        margin=1.0,
        trade_on_close=False,
        hedging=False,
        exclusive_orders=False,
        finalize_trades=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bt.run()


def _rel_close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-300)


# --- tests ------------------------------------------------------------------------------


def test_every_strategy_is_covered() -> None:
    # `model` trades a trained bundle's predictions: tests/test_train_container.py checks its
    # positions against predictions recomputed by hand
    assert {name for name, _ in CASES} == set(strategy_names()) - {"model"}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
@pytest.mark.parametrize("long_only", [False, True], ids=["long_short", "long_only"])
def test_signals_match_per_bar_reference(
    dataset: str, name: str, params: dict[str, Any], long_only: bool
) -> None:
    bars = DATASETS[dataset]
    strategy = get_strategy(name)
    parsed = strategy.parse_params(params)
    got = strategy.positions(bars, parsed, long_only)
    want = np.asarray(ref_signals(name, bars, params, long_only), dtype=np.int8)
    assert got.dtype == np.int8 and got.shape == (len(bars),)
    mismatch = np.flatnonzero(got != want)
    assert mismatch.size == 0, f"first mismatch at bar {mismatch[:5]}"
    assert np.count_nonzero(np.diff(want)) >= 4, "the case should trade"
    assert not np.any(got[: strategy.warmup(parsed)]), "no position during warm-up"
    if long_only:
        assert got.min() >= 0


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
@pytest.mark.parametrize(
    "setup",
    [
        {"fraction": None, "close_at_end": False, "long_only": False},
        {"fraction": 0.5, "close_at_end": True, "long_only": False},
        {"fraction": None, "close_at_end": True, "long_only": True},
    ],
    ids=["all_in", "fraction_close_at_end", "long_only_close_at_end"],
)
def test_engine_matches_per_bar_simulation(
    dataset: str, name: str, params: dict[str, Any], setup: dict[str, Any]
) -> None:
    bars = DATASETS[dataset]
    strategy = get_strategy(name)
    target = strategy.positions(bars, strategy.parse_params(params), setup["long_only"])
    signals = ref_signals(name, bars, params, setup["long_only"])
    config = EngineConfig(
        initial_capital=100_000,
        commission=0.001,
        slippage=0.0005,
        sizing="fraction" if setup["fraction"] else "all_in",
        fraction=setup["fraction"] or 1.0,
        close_at_end=setup["close_at_end"],
    )
    result = simulate(bars, target, config)
    ref_trades, ref_equity = ref_simulate(
        bars,
        signals,
        capital=100_000,
        commission=0.001,
        slippage=0.0005,
        fraction=setup["fraction"],
        close_at_end=setup["close_at_end"],
    )
    got = result.trades if setup["close_at_end"] else result.trades.closed
    assert len(got) == len(ref_trades) > 0
    assert got.entry_bar.tolist() == [t["entry_bar"] for t in ref_trades]
    assert got.exit_bar.tolist() == [t["exit_bar"] for t in ref_trades]
    assert got.units.tolist() == [t["units"] for t in ref_trades]
    assert got.direction.tolist() == [t["direction"] for t in ref_trades]
    for key, col in (("entry_price", got.entry_price), ("exit_price", got.exit_price)):
        assert all(_rel_close(a, t[key]) for a, t in zip(col.tolist(), ref_trades, strict=True))
    assert all(_rel_close(a, t["pnl"]) for a, t in zip(got.pnl.tolist(), ref_trades, strict=True))
    assert _rel_close(result.final_equity, ref_equity[-1])
    np.testing.assert_allclose(result.equity, ref_equity, rtol=REL)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
@pytest.mark.parametrize("fraction", [None, 0.6], ids=["all_in", "fraction"])
@pytest.mark.parametrize("long_only", [False, True], ids=["long_short", "long_only"])
def test_engine_matches_backtesting_py(
    dataset: str, name: str, params: dict[str, Any], fraction: float | None, long_only: bool
) -> None:
    """Same trades (bars, sizes, prices) and final equity as backtesting.py.

    backtesting.py applies its ``spread`` on entries only, so the comparison runs with
    no slippage (the per-bar simulation above covers slippage).
    """
    bars = DATASETS[dataset]
    strategy = get_strategy(name)
    target = strategy.positions(bars, strategy.parse_params(params), long_only)
    config = EngineConfig(
        commission=0.001,
        slippage=0.0,
        sizing="fraction" if fraction else "all_in",
        fraction=fraction or 1.0,
    )
    result = simulate(bars, target, config)
    stats = peer_run(
        PEER_FRAMES[dataset],
        ref_signals(name, bars, params, long_only),
        commission=0.001,
        fraction=fraction,
    )
    peer = stats["_trades"]
    ours = result.trades.closed
    assert len(ours) == len(peer) > 0
    assert ours.entry_bar.tolist() == peer["EntryBar"].tolist()
    assert ours.exit_bar.tolist() == peer["ExitBar"].tolist()
    assert (ours.direction * ours.units).tolist() == peer["Size"].astype(int).tolist()
    np.testing.assert_allclose(ours.entry_price, peer["EntryPrice"], rtol=REL)
    np.testing.assert_allclose(ours.exit_price, peer["ExitPrice"], rtol=REL)
    np.testing.assert_allclose(ours.pnl, peer["PnL"], rtol=REL)
    assert _rel_close(result.final_equity, float(stats["Equity Final [$]"]))
    np.testing.assert_allclose(result.equity, stats["_equity_curve"]["Equity"], rtol=REL)


# --- hand-computed small cases ----------------------------------------------------------


def _tiny(opens: list[float], closes: list[float]) -> Bars:
    n = len(opens)
    index = pd.date_range("2024-01-01", periods=n, freq="D", tz="UTC")
    frame = pd.DataFrame(
        {
            "open": opens,
            "high": np.maximum(opens, closes),
            "low": np.minimum(opens, closes),
            "close": closes,
            "volume": 1.0,
        },
        index=index,
    )
    return Bars.from_frame(frame)


def test_hand_computed_long_then_short_with_costs() -> None:
    bars = _tiny([10, 11, 12, 13, 14, 15], [10.5, 11.5, 12.5, 13.5, 14.5, 15.5])
    # long decided on bar 0 -> filled at bar 1's open (11); short decided on bar 2 -> bar 3.
    target = np.array([1, 1, -1, -1, -1, 0])
    cfg = EngineConfig(initial_capital=1000, commission=0.01, slippage=0.0)
    r = simulate(bars, target, cfg)
    # Entry: floor(1000 / (11 * 1.01)) = 90 units, fee 9.9, cash 1000 - 990 - 9.9 = 0.1.
    # Exit at 13: 90 * 13 = 1170, fee 11.7 -> cash 1158.4. Short: floor(1158.4 / 13.13) = 88
    # units, proceeds 1144, fee 11.44 -> cash 2290.96. Exit (target 0 on bar 5) never fills.
    t = r.trades
    assert t.entry_bar.tolist() == [1, 3] and t.exit_bar.tolist() == [3, 5]
    assert t.units.tolist() == [90, 88] and t.direction.tolist() == [1, -1]
    assert t.is_open.tolist() == [False, True]
    assert t.pnl[0] == pytest.approx(90 * 2 - 9.9 - 11.7)
    assert r.equity.tolist() == pytest.approx(
        [
            1000,
            0.1 + 90 * 11.5,
            0.1 + 90 * 12.5,
            2290.96 - 88 * 13.5,
            2290.96 - 88 * 14.5,
            2290.96 - 88 * 15.5,
        ]
    )
    assert r.commissions_paid == pytest.approx(9.9 + 11.7 + 11.44)
    # close_at_end buys the short back at the last close with commission.
    r2 = simulate(
        bars, target, EngineConfig(initial_capital=1000, commission=0.01, slippage=0.0, close_at_end=True)
    )
    assert r2.final_equity == pytest.approx(2290.96 - 88 * 15.5 - 0.01 * 88 * 15.5)
    assert not r2.trades.is_open.any()


def test_hand_computed_slippage_moves_fills_against_the_trade() -> None:
    bars = _tiny([100, 100, 110, 120], [100, 105, 115, 120])
    r = simulate(
        bars, np.array([1, 0, -1, 0]), EngineConfig(initial_capital=10_000, commission=0.0, slippage=0.01)
    )
    t = r.trades
    assert t.entry_price.tolist() == pytest.approx([101.0, 120 * 0.99 * 1.0])
    assert t.exit_price.tolist() == pytest.approx([110 * 0.99, 120.0])  # last is the mark
    assert t.units[0] == 10_000 // 101


def test_unaffordable_entry_is_skipped_and_fraction_sizes_down() -> None:
    bars = _tiny([500, 500, 500, 500], [500, 500, 500, 500])
    r = simulate(bars, np.array([1, 1, 1, 1]), EngineConfig(initial_capital=400))
    assert len(r.trades) == 0 and r.final_equity == 400
    r = simulate(
        bars,
        np.array([1, 1, 1, 1]),
        EngineConfig(initial_capital=10_000, commission=0, slippage=0, sizing="fraction", fraction=0.25),
    )
    assert r.trades.units.tolist() == [5]


def test_target_is_validated() -> None:
    bars = _tiny([1, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="one value per bar"):
        simulate(bars, np.array([0, 1]))
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        simulate(bars, np.array([0, 2, 0]))
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        simulate(bars, np.array([0, 0.5, 0]))


def test_strategy_params_are_validated() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="fast"):
        get_strategy("sma_cross").parse_params({"fast": 30, "slow": 10})
    with pytest.raises(msgspec.ValidationError, match="lower"):
        get_strategy("rsi_reversion").parse_params({"lower": 80, "upper": 70})
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        get_strategy("donchian_breakout").parse_params({"lookbak": 5})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.k"):
        get_strategy("bollinger_reversion").parse_params({"k": -1})
    assert get_strategy("sma_cross").parse_params({"fast": "5", "slow": 20.0}).fast == 5


def test_sma_cross_counts_a_cross_from_equality() -> None:
    """fast=1, slow=2: fast - slow = (c[t] - c[t-1]) / 2, zero when the close repeats."""
    bars = _tiny([5, 6, 4, 4, 6], [5, 6, 4, 4, 6])
    params = get_strategy("sma_cross").parse_params({"fast": 1, "slow": 2})
    got = get_strategy("sma_cross").positions(bars, params, False)
    # bar 2 crosses down (+0.5 -> -1), bar 3 is a tie (holds), bar 4 crosses up from the tie.
    assert got.tolist() == [0, 0, -1, -1, 1]
    assert get_strategy("sma_cross").positions(bars, params, True).tolist() == [0, 0, 0, 0, 1]


def test_ruin_closes_at_the_close_and_stops_trading() -> None:
    # Short 10 units at 100 with 1000 cash (cash 2000 after the sale); equity = 2000 - 10·c
    # reaches zero when the close hits 200 (bar 3); the later long signal never trades.
    bars = _tiny([100, 100, 150, 190, 100, 100], [100, 120, 180, 205, 100, 100])
    target = np.array([-1, -1, -1, -1, 1, 1])
    r = simulate(bars, target, EngineConfig(initial_capital=1000, commission=0, slippage=0))
    assert r.ruined_at == 3
    assert r.equity.tolist() == [1000, 2000 - 1200, 2000 - 1800, 0, 0, 0]
    assert r.trades.exit_bar.tolist() == [3] and r.trades.exit_price.tolist() == [205]
    assert r.trades.pnl.tolist() == [-10 * 105] and not r.trades.is_open.any()
    assert r.units.tolist() == [0, -10, -10, -10, 0, 0]


def test_ruin_after_a_gap_through_the_exit() -> None:
    # Short closes at a gap open of 250: cash 2000 - 2500 < 0 while flat -> ruined there.
    bars = _tiny([100, 100, 250, 100], [100, 150, 250, 100])
    r = simulate(bars, np.array([-1, 0, 1, 1]), EngineConfig(initial_capital=1000, commission=0, slippage=0))
    assert r.ruined_at == 2 and r.final_equity == 0
    assert len(r.trades) == 1 and r.trades.exit_bar.tolist() == [2]
