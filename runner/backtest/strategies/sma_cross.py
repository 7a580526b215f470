"""``sma_cross(fast, slow)``: trade the crossings of two simple moving averages.

Long from the bar on which the fast SMA crosses above the slow one, short (flat in
long-only mode) from the bar on which it crosses below; no position before the first
cross. A cross up on bar ``t`` means ``fast[t-1] <= slow[t-1]`` and ``fast[t] > slow[t]``
(down: ``>=`` then ``<``). Warm-up: ``slow`` bars (the first cross can be seen on bar
index ``slow``, when both averages exist on the bar before).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta

from runner.backtest.data import Bars
from runner.backtest.strategies import Strategy, register
from runner.backtest.strategies._common import finish, hold_last, rolling_mean, shift


class SmaCrossParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Parameters of ``sma_cross``: window lengths in bars, ``fast < slow``."""

    fast: Annotated[int, Meta(ge=1, le=10_000)] = 10
    slow: Annotated[int, Meta(ge=2, le=10_000)] = 30

    def __post_init__(self) -> None:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be smaller than slow ({self.slow})")


def warmup(params: SmaCrossParams) -> int:
    """Bars before the first decision: the slow SMA must exist on the previous bar."""
    return params.slow


def positions(bars: Bars, params: SmaCrossParams, long_only: bool) -> np.ndarray:
    """Target position per bar (int8 -1/0/1)."""
    diff = rolling_mean(bars.close, params.fast) - rolling_mean(bars.close, params.slow)
    prev = shift(diff)
    with np.errstate(invalid="ignore"):
        up = (prev <= 0) & (diff > 0)
        down = (prev >= 0) & (diff < 0)
    events = up.astype(np.int8) - down.astype(np.int8)
    return finish(hold_last(events), warmup(params), long_only)


STRATEGY = register(
    Strategy(
        name="sma_cross",
        params_type=SmaCrossParams,
        warmup=warmup,
        positions=positions,
        description="long when the fast SMA crosses above the slow SMA, short when below",
    )
)
