"""Backtests per second: the ktrdr-run engine beside backtesting.py, measured in one run.

Both run ``sma_cross(fast=10, slow=30)``, long/short, all-in whole units, commission 0.1 %,
decided on the close and filled at the next open, on:

- GOOG daily: 2,148 real bars (shipped with backtesting.py);
- EURUSD hourly extended: backtesting.py's 5,000 real hourly bars tiled 20 times to
  100,000 bars, each copy rescaled to open where the previous one closed and shifted by
  whole weeks (so weekdays stay weekdays). The tiling is synthetic; the bars are real.

A backtest, for ours, is the whole pipeline (positions, simulation, all 24 metrics); for
backtesting.py it is ``Backtest.run()`` (which also computes its statistics). The trade
counts of both are printed as a sanity check: the same semantics give the same trades.

Run: ``python bench/backtest_speed.py`` (dev extra installed; about a minute).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from backtesting import Backtest, Strategy
from backtesting.test import EURUSD, GOOG

from runner.backtest.data import Bars
from runner.backtest.engine import EngineConfig, simulate
from runner.backtest.metrics import compute_metrics
from runner.backtest.strategies import get_strategy

FAST, SLOW = 10, 30
COMMISSION = 0.001


def extend(frame: pd.DataFrame, copies: int) -> pd.DataFrame:
    """``frame`` tiled ``copies`` times, prices continuous, shifted by whole weeks."""
    week = pd.Timedelta(days=7)
    span = frame.index[-1] - frame.index[0]
    shift = week * (int(span / week) + 1)
    parts, scale = [], 1.0
    prices = ["Open", "High", "Low", "Close"]
    for k in range(copies):
        part = frame.copy()
        part[prices] = part[prices] * scale
        part.index = part.index + shift * k
        parts.append(part)
        scale = float(part["Close"].iloc[-1]) / float(frame["Open"].iloc[0])
    return pd.concat(parts)


class SmaCrossPeer(Strategy):
    """backtesting.py strategy with the same crossing rule and fills as ``sma_cross``."""

    fast = FAST
    slow = SLOW

    def init(self) -> None:
        def sma(values: np.ndarray, n: int) -> np.ndarray:
            return pd.Series(values).rolling(n).mean().to_numpy()

        self.f = self.I(sma, self.data.Close, self.fast)
        self.s = self.I(sma, self.data.Close, self.slow)

    def next(self) -> None:
        f, s = self.f, self.s
        if f[-2] <= s[-2] and f[-1] > s[-1] and not self.position.is_long:
            self.position.close()
            self.buy()
        elif f[-2] >= s[-2] and f[-1] < s[-1] and not self.position.is_short:
            self.position.close()
            self.sell()


def ours(frame: pd.DataFrame) -> Callable[[], int]:
    """One full backtest with the ktrdr-run engine; returns the closed-trade count."""
    bars = Bars.from_frame(frame.rename(columns=str.lower))
    strategy = get_strategy("sma_cross")
    params = strategy.parse_params({"fast": FAST, "slow": SLOW})
    config = EngineConfig(commission=COMMISSION, slippage=0.0)

    def run() -> int:
        result = simulate(bars, strategy.positions(bars, params, False), config)
        trades = compute_metrics(result)["total_trades"]
        assert isinstance(trades, int)
        return trades

    return run


def peer(frame: pd.DataFrame) -> Callable[[], int]:
    """One backtesting.py run; returns its closed-trade count."""
    bt = Backtest(frame, SmaCrossPeer, cash=100_000, commission=COMMISSION)

    def run() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(bt.run()["# Trades"])

    return run


def rate(fn: Callable[[], int], seconds: float, min_runs: int) -> tuple[float, int, int]:
    """Backtests per second over at least ``seconds`` and ``min_runs`` runs."""
    trades = fn()  # warm-up (imports, caches), not timed
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if runs >= min_runs and elapsed >= seconds:
            return runs / elapsed, runs, trades


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per cell")
    args = parser.parse_args()

    datasets = [
        ("GOOG 1d (real)", GOOG, 2),
        ("EURUSD 1h tiled x20", extend(EURUSD, 20), 1),
    ]
    print(f"sma_cross({FAST}, {SLOW}), commission {COMMISSION}, next-open fills, whole units")
    header = (
        f"{'data':<22}{'bars':>9}{'ktrdr-run bt/s':>16}{'backtesting.py bt/s':>21}"
        f"{'ratio':>9}{'trades ours/peer':>19}"
    )
    print(header)
    print("-" * len(header))
    for name, frame, peer_runs in datasets:
        our_rate, _, our_trades = rate(ours(frame), args.seconds, 5)
        peer_rate, _, peer_trades = rate(peer(frame), args.seconds, peer_runs)
        print(
            f"{name:<22}{len(frame):>9,}{our_rate:>16,.1f}{peer_rate:>21,.2f}"
            f"{our_rate / peer_rate:>8,.0f}x{f'{our_trades}/{peer_trades}':>19}"
        )


if __name__ == "__main__":
    main()
