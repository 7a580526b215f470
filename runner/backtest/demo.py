"""A deterministic, generated demo data set: **synthetic, not market data**.

It lets ``ktrdr-run backtest ... DEMO`` run on a fresh machine with no data prepared. The
bars come from a seeded random walk (a geometric Brownian motion whose drift switches
between regimes, so trend and mean-reversion strategies both have something to trade);
the same seed and timeframe always give the same file. Anything that reports on a backtest
of this data must say it is synthetic: :data:`DEMO_DATA_SOURCE` is the wording.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

DEMO_SYMBOL = "DEMO"
DEMO_DATA_SOURCE = "synthetic demo data (generated, not market data)"
DEMO_SEED = 20_240_601
DEFAULT_BARS = 2_520  # about ten years of daily bars

_UNITS = {"m": "min", "min": "min", "h": "h", "d": "D", "w": "W"}


def _frequency(timeframe: str) -> str:
    match = re.fullmatch(r"(\d{1,4})([A-Za-z]{1,3})", timeframe)
    unit = match.group(2) if match else ""
    if not match or unit not in _UNITS or int(match.group(1)) < 1:
        raise ValueError(
            f"timeframe {timeframe!r}: demo data supports N followed by m, h, d or w (e.g. 1d, 1h)"
        )
    return f"{int(match.group(1))}{_UNITS[unit]}"


def generate_demo_bars(
    timeframe: str = "1d", n_bars: int = DEFAULT_BARS, seed: int = DEMO_SEED
) -> pd.DataFrame:
    """Synthetic OHLCV bars with a UTC DatetimeIndex named ``timestamp``.

    Daily bars fall on business days from 2015-01-02; intraday bars run around the clock
    on business days; weekly bars on Fridays. Prices are positive and consistent
    (``low <= open, close <= high``).
    """
    import pandas as pd

    if n_bars < 2:
        raise ValueError(f"n_bars must be at least 2, got {n_bars}")
    freq = _frequency(timeframe)
    start = pd.Timestamp("2015-01-02", tz="UTC")
    if freq == "1D":
        index = pd.bdate_range(start, periods=n_bars, tz="UTC")
    elif freq.endswith("W"):
        index = pd.date_range(start, periods=n_bars, freq=f"{freq}-FRI", tz="UTC")
    else:
        # Oversample, then keep business days only.
        raw = pd.date_range(start, periods=n_bars * 2 + 16, freq=freq, tz="UTC")
        index = raw[raw.day_of_week < 5][:n_bars]
    rng = np.random.default_rng(seed)
    step = pd.Timedelta(freq)
    if freq.endswith("W"):
        per_year = 52.0 / int(freq[:-1])
    else:  # business days, scaled by bars per day (fewer than one for multi-day bars)
        per_year = 252.0 * (pd.Timedelta(days=1) / step)
    sigma = 0.22 / np.sqrt(per_year)
    # Drift regimes of ~120 bars each: bull, bear, sideways.
    regimes = rng.choice(np.array([0.25, -0.18, 0.02]), size=n_bars // 120 + 1)
    drift = np.repeat(regimes, 120)[:n_bars] / per_year
    log_returns = drift - 0.5 * sigma**2 + sigma * rng.standard_normal(n_bars)
    close = 100.0 * np.exp(np.cumsum(log_returns))
    prev_close = np.concatenate(([100.0], close[:-1]))
    open_ = prev_close * np.exp(0.25 * sigma * rng.standard_normal(n_bars))
    spread = np.abs(sigma * rng.standard_normal((2, n_bars)))
    high = np.maximum(open_, close) * np.exp(spread[0])
    low = np.minimum(open_, close) * np.exp(-spread[1])
    volume = rng.integers(50_000, 5_000_000, size=n_bars).astype(np.float64)
    frame = pd.DataFrame(
        {
            "open": open_.round(4),
            "high": high.round(4),
            "low": low.round(4),
            "close": close.round(4),
            "volume": volume,
        },
        index=pd.DatetimeIndex(index, name="timestamp"),
    )
    # Rounding can nudge a bound inside open/close; restore consistency.
    frame["high"] = frame[["open", "high", "close"]].max(axis=1)
    frame["low"] = frame[["open", "low", "close"]].min(axis=1)
    return frame


def demo_file_name(timeframe: str = "1d") -> str:
    """The file name the demo data is written under, KTRDR style."""
    return f"{DEMO_SYMBOL}_{timeframe}.csv"


def write_demo_data(directory: Path, timeframe: str = "1d", n_bars: int = DEFAULT_BARS) -> Path:
    """Write ``DEMO_{timeframe}.csv`` (synthetic) into ``directory`` and return its path.

    The CSV uses KTRDR's layout: a ``timestamp`` column in ``%Y-%m-%dT%H:%M:%SZ`` then
    ``open, high, low, close, volume``. Existing identical content is left alone.
    """
    frame = generate_demo_bars(timeframe, n_bars)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / demo_file_name(timeframe)
    text = frame.to_csv(date_format="%Y-%m-%dT%H:%M:%SZ", float_format="%.4f")
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".csv.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path
