"""``bollinger_reversion(period, k)``: fade closes outside the Bollinger bands.

Bands on bar ``t``: ``mid`` is the simple mean of the last ``period`` closes (bar ``t``
included), ``sd`` their population standard deviation (ddof=0), ``upper = mid + k·sd``,
``lower = mid - k·sd``. Enter long on a close below ``lower`` and hold it until a close at
or above ``mid``; enter short (nothing in long-only mode) on a close above ``upper`` and hold
it until a close at or below ``mid``; flat otherwise. Warm-up: ``period - 1`` bars.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from runner.backtest.data import Bars
from runner.backtest.strategies import Strategy, register
from runner.backtest.strategies._common import finish, last_index, rolling_mean, rolling_std


class BollingerReversionParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Parameters of ``bollinger_reversion``: window in bars, band width in std devs."""

    period: Annotated[int, Meta(ge=2, le=10_000)] = 20
    k: Annotated[float, Meta(gt=0, le=100)] = 2.0


def warmup(params: BollingerReversionParams) -> int:
    """Bars before the first complete window."""
    return params.period - 1


def positions(bars: Bars, params: BollingerReversionParams, long_only: bool) -> np.ndarray:
    """Target position per bar (int8 -1/0/1)."""
    close = bars.close
    mid = rolling_mean(close, params.period)
    width = params.k * rolling_std(close, params.period)
    with np.errstate(invalid="ignore"):
        enter_long = close < mid - width
        enter_short = close > mid + width
        exit_long = close >= mid
        exit_short = close <= mid
    # A position is open while its latest entry is more recent than its latest exit.
    long = last_index(enter_long) > last_index(exit_long)
    short = last_index(enter_short) > last_index(exit_short)
    out = long.astype(np.int8) - short.astype(np.int8)
    return finish(out, warmup(params), long_only)


STRATEGY = register(
    Strategy(
        name="bollinger_reversion",
        params_type=BollingerReversionParams,
        warmup=warmup,
        positions=positions,
        description="long below the lower band until the mean, short above the upper band",
    )
)
