"""Vectorized building blocks shared by the strategies (no per-bar Python loops)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Windows are reduced in row chunks so a temporary never exceeds this many elements.
_CHUNK_ELEMENTS = 1 << 22


def _rolling(values: np.ndarray, window: int, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``out[t] = reduce(values[t-window+1 : t+1])``; NaN for the first ``window-1`` bars."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    out = np.full(x.shape[0], np.nan)
    if window < 1 or x.shape[0] < window:
        return out
    view = sliding_window_view(x, window)
    rows = max(1, _CHUNK_ELEMENTS // window)
    for lo in range(0, view.shape[0], rows):
        hi = min(lo + rows, view.shape[0])
        out[window - 1 + lo : window - 1 + hi] = reduce(view[lo:hi])
    return out


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Simple moving average over ``window`` bars ending at each bar (inclusive)."""
    return _rolling(values, window, lambda v: v.mean(axis=1))


def rolling_std(values: np.ndarray, window: int) -> np.ndarray:
    """Population standard deviation (ddof=0) over ``window`` bars ending at each bar."""
    return _rolling(values, window, lambda v: v.std(axis=1))


def rolling_max(values: np.ndarray, window: int) -> np.ndarray:
    """Highest value over ``window`` bars ending at each bar (inclusive)."""
    return _rolling(values, window, lambda v: v.max(axis=1))


def rolling_min(values: np.ndarray, window: int) -> np.ndarray:
    """Lowest value over ``window`` bars ending at each bar (inclusive)."""
    return _rolling(values, window, lambda v: v.min(axis=1))


def shift(values: np.ndarray, periods: int = 1) -> np.ndarray:
    """``values`` moved ``periods`` bars later, NaN-filled at the start."""
    out = np.full(values.shape[0], np.nan)
    if periods < values.shape[0]:
        out[periods:] = values[: values.shape[0] - periods]
    return out


def hold_last(events: np.ndarray) -> np.ndarray:
    """Carry the last non-zero event forward: the position a stream of signals implies.

    ``events[t]`` is +1 (go long), -1 (go short) or 0 (no event: keep the position).
    Before the first event the position is 0.
    """
    n = events.shape[0]
    idx = np.where(events != 0, np.arange(n), -1)
    np.maximum.accumulate(idx, out=idx)
    return np.where(idx >= 0, events[np.maximum(idx, 0)], 0).astype(np.int8)


def last_index(mask: np.ndarray) -> np.ndarray:
    """For each bar, the index of the latest bar at or before it where ``mask`` is True (-1 if none)."""
    idx = np.where(mask, np.arange(mask.shape[0]), -1)
    np.maximum.accumulate(idx, out=idx)
    return idx


def finish(positions: np.ndarray, warmup: int, long_only: bool) -> np.ndarray:
    """Zero the warm-up bars, drop shorts in long-only mode, return ``int8``."""
    out = positions.astype(np.int8, copy=True)
    out[: min(warmup, out.shape[0])] = 0
    if long_only:
        np.maximum(out, 0, out=out)
    return out
