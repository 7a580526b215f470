"""``donchian_breakout(lookback)``: trade breakouts of the prior Donchian channel.

The channel on bar ``t`` is the highest high and the lowest low of the ``lookback`` bars
before it (``t-lookback .. t-1``; bar ``t`` itself excluded). Long from a bar that closes
above the channel's top, short (flat in long-only mode) from a bar that closes below its
bottom, the position held otherwise. Warm-up: ``lookback`` bars.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from runner.backtest.data import Bars
from runner.backtest.strategies import Strategy, register
from runner.backtest.strategies._common import finish, hold_last, rolling_max, rolling_min, shift


class DonchianBreakoutParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Parameters of ``donchian_breakout``: channel length in bars."""

    lookback: Annotated[int, Meta(ge=1, le=10_000)] = 20


def warmup(params: DonchianBreakoutParams) -> int:
    """Bars before the first complete prior channel."""
    return params.lookback


def positions(bars: Bars, params: DonchianBreakoutParams, long_only: bool) -> np.ndarray:
    """Target position per bar (int8 -1/0/1)."""
    top = shift(rolling_max(bars.high, params.lookback))
    bottom = shift(rolling_min(bars.low, params.lookback))
    with np.errstate(invalid="ignore"):
        events = (bars.close > top).astype(np.int8) - (bars.close < bottom).astype(np.int8)
    return finish(hold_last(events), warmup(params), long_only)


STRATEGY = register(
    Strategy(
        name="donchian_breakout",
        params_type=DonchianBreakoutParams,
        warmup=warmup,
        positions=positions,
        description="long on a close above the prior N-bar high, short below the prior low",
    )
)
