"""``rsi_reversion(period, lower, upper)``: fade RSI extremes.

RSI is Wilder's: with ``d[t] = close[t] - close[t-1]``, gains ``max(d, 0)`` and losses
``max(-d, 0)``, the averages ``G`` and ``L`` start on bar ``period`` as the plain means of
the first ``period`` gains and losses, then ``G[t] = (G[t-1]·(period-1) + gain[t]) / period``
(same for ``L``); ``RSI = 100·G / (G + L)`` (50 when both are zero).

Long from a bar whose RSI is below ``lower``, short (flat in long-only mode) from a bar
whose RSI is above ``upper``, the position held otherwise; no position before the first
such bar. Warm-up: ``period`` bars.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from runner.backtest.data import Bars
from runner.backtest.strategies import Strategy, register
from runner.backtest.strategies._common import finish, hold_last


class RsiReversionParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Parameters of ``rsi_reversion``: RSI period in bars, thresholds in (0, 100)."""

    period: Annotated[int, Meta(ge=2, le=10_000)] = 14
    lower: Annotated[float, Meta(gt=0, lt=100)] = 30.0
    upper: Annotated[float, Meta(gt=0, lt=100)] = 70.0

    def __post_init__(self) -> None:
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be smaller than upper ({self.upper})")


def warmup(params: RsiReversionParams) -> int:
    """Bars before the first RSI value."""
    return params.period


def wilder_rsi(close: np.ndarray, period: int) -> np.ndarray:
    """Wilder's RSI per bar, NaN for the first ``period`` bars."""
    import pandas as pd

    n = close.shape[0]
    rsi = np.full(n, np.nan)
    if n <= period:
        return rsi
    change = np.diff(close)
    gain = np.maximum(change, 0.0)
    loss = np.maximum(-change, 0.0)
    alpha = 1.0 / period
    avg = []
    for series in (gain, loss):
        seeded = np.concatenate(([series[:period].mean()], series[period:]))
        smoothed = pd.Series(seeded).ewm(alpha=alpha, adjust=False).mean().to_numpy()
        avg.append(smoothed)
    g, l_ = avg
    total = g + l_
    with np.errstate(invalid="ignore", divide="ignore"):
        rsi[period:] = np.where(total > 0, 100.0 * g / total, 50.0)
    return rsi


def positions(bars: Bars, params: RsiReversionParams, long_only: bool) -> np.ndarray:
    """Target position per bar (int8 -1/0/1)."""
    rsi = wilder_rsi(bars.close, params.period)
    with np.errstate(invalid="ignore"):
        events = (rsi < params.lower).astype(np.int8) - (rsi > params.upper).astype(np.int8)
    return finish(hold_last(events), warmup(params), long_only)


STRATEGY = register(
    Strategy(
        name="rsi_reversion",
        params_type=RsiReversionParams,
        warmup=warmup,
        positions=positions,
        description="long when RSI is below lower, short when above upper",
    )
)
