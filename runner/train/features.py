"""Features for training: a documented, versioned spec computed from OHLCV bars.

Every feature at bar ``t`` uses bars ``<= t`` only (trailing windows), and each one a
bounded window, so a value does not depend on where the data starts once the warm-up is
over. Feature set version :data:`FEATURE_SPEC_VERSION` (names for the default spec):

- ``log_return_{h}``: ``ln(close[t] / close[t-h])`` for each h in ``return_horizons``
  (1, 5, 10, 20);
- ``volatility_{w}``: the sample standard deviation (ddof 1) of the last ``w`` one-bar log
  returns, not annualised (w in ``volatility_windows``: 10, 20);
- ``rsi_{n}``: RSI in [0, 100] with simple averages of the last ``n`` gains and losses
  (Cutler's RSI; 50 when the close did not move), n = ``rsi_period`` (14);
- ``close_sma_{w}``: ``close[t] / mean(close[t-w+1..t])`` (w in ``sma_windows``: 10, 20, 50);
- ``atr_{n}``: the mean true range of the last ``n`` bars divided by ``close[t]``
  (``atr_period``: 14);
- ``volume_zscore_{w}``: ``(volume[t] - mean) / std`` over the last ``w`` volumes (ddof 0;
  0 when the volume did not vary), w = ``volume_window`` (20).

The first :func:`warmup_rows` bars cannot have every feature and are dropped. A change to
any formula bumps :data:`FEATURE_SPEC_VERSION`: a model bundle records the version it was
trained with, and :func:`check_spec_version` refuses another.

:class:`Standardizer` scales each feature by the mean and standard deviation of the
training rows only, and is saved as plain lists in the model bundle.

numpy and pandas are imported inside the functions: the dispatcher imports
:class:`FeatureSpec` to validate params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct

from runner.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

FEATURE_SPEC_VERSION = 1
# A training feature whose standard deviation is below this is scaled by 1, not by ~0
# (a constant feature would otherwise blow up any row that differs from it).
STD_FLOOR = 1e-8

Window = Annotated[int, Meta(ge=2, le=1000)]


class FeatureSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """The windows of the feature set (in bars); see the module docstring for formulas."""

    return_horizons: Annotated[tuple[Annotated[int, Meta(ge=1, le=1000)], ...], Meta(min_length=1)] = (
        1,
        5,
        10,
        20,
    )
    volatility_windows: tuple[Window, ...] = (10, 20)
    rsi_period: Window = 14
    sma_windows: tuple[Window, ...] = (10, 20, 50)
    atr_period: Window = 14
    volume_window: Window = 20


def spec_problem(spec: FeatureSpec) -> tuple[str, str] | None:
    """(field, problem) when ``spec`` repeats a window (two features of one name), else None."""
    for field in ("return_horizons", "volatility_windows", "sma_windows"):
        values = getattr(spec, field)
        if len(set(values)) != len(values):
            return field, f"each window may appear once, got {list(values)}"
    return None


def feature_names(spec: FeatureSpec) -> list[str]:
    """The feature columns of ``spec``, in order."""
    return [
        *(f"log_return_{h}" for h in spec.return_horizons),
        *(f"volatility_{w}" for w in spec.volatility_windows),
        f"rsi_{spec.rsi_period}",
        *(f"close_sma_{w}" for w in spec.sma_windows),
        f"atr_{spec.atr_period}",
        f"volume_zscore_{spec.volume_window}",
    ]


def warmup_rows(spec: FeatureSpec) -> int:
    """Leading bars without every feature: the first feature row is this bar index."""
    return max(
        max(spec.return_horizons),
        max(spec.volatility_windows, default=0),  # w returns need w + 1 closes
        spec.rsi_period,  # n changes need n + 1 closes
        max(spec.sma_windows, default=1) - 1,
        spec.atr_period,  # a true range needs the previous close
        spec.volume_window - 1,
    )


def spec_to_dict(spec: FeatureSpec) -> dict[str, Any]:
    """The spec as plain builtins (lists), with its version, for the model bundle."""
    return {
        "version": FEATURE_SPEC_VERSION,
        "return_horizons": list(spec.return_horizons),
        "volatility_windows": list(spec.volatility_windows),
        "rsi_period": spec.rsi_period,
        "sma_windows": list(spec.sma_windows),
        "atr_period": spec.atr_period,
        "volume_window": spec.volume_window,
    }


def check_spec_version(saved: dict[str, Any]) -> None:
    """Raise DataError unless a saved spec has this code's feature version."""
    version = saved.get("version")
    if version != FEATURE_SPEC_VERSION:
        raise DataError(
            f"the model was trained with feature set version {version!r}, this runner computes "
            f"version {FEATURE_SPEC_VERSION}; retrain the model"
        )


def spec_from_dict(saved: dict[str, Any]) -> FeatureSpec:
    """The FeatureSpec of a bundle's saved spec (checks the version)."""
    import msgspec

    check_spec_version(saved)
    fields = {k: v for k, v in saved.items() if k != "version"}
    return msgspec.convert(fields, FeatureSpec)


def compute_features(frame: pd.DataFrame, spec: FeatureSpec | None = None) -> pd.DataFrame:
    """The features of ``frame`` (DatetimeIndex, ``open high low close volume``).

    Returns one row per bar after the warm-up (:func:`warmup_rows`), float64, columns
    :func:`feature_names`, same index. Raises DataError when a value is not finite after the
    warm-up (a missing volume, say), naming the feature and the bar.
    """
    import numpy as np
    import pandas as pd

    spec = spec or FeatureSpec()
    close = frame["close"].astype(np.float64)
    high = frame["high"].astype(np.float64)
    low = frame["low"].astype(np.float64)
    volume = frame["volume"].astype(np.float64)
    log_close = pd.Series(np.log(close.to_numpy()), index=frame.index)
    r1 = log_close.diff()
    columns: dict[str, pd.Series] = {}
    for h in spec.return_horizons:
        columns[f"log_return_{h}"] = log_close - log_close.shift(h)
    for w in spec.volatility_windows:
        columns[f"volatility_{w}"] = r1.rolling(w, min_periods=w).std(ddof=1)
    n = spec.rsi_period
    change = close.diff()
    gain = change.clip(lower=0).rolling(n, min_periods=n).mean()
    loss = (-change).clip(lower=0).rolling(n, min_periods=n).mean()
    moved = gain + loss
    columns[f"rsi_{n}"] = (100.0 * gain / moved).mask(moved == 0, 50.0)
    for w in spec.sma_windows:
        columns[f"close_sma_{w}"] = close / close.rolling(w, min_periods=w).mean()
    prev_close = close.shift(1)
    true_range = pd.concat([high - low, (high - prev_close).abs(), (low - prev_close).abs()], axis=1).max(
        axis=1, skipna=False
    )
    a = spec.atr_period
    columns[f"atr_{a}"] = true_range.rolling(a, min_periods=a).mean() / close
    v = spec.volume_window
    mean = volume.rolling(v, min_periods=v).mean()
    std = volume.rolling(v, min_periods=v).std(ddof=0)
    columns[f"volume_zscore_{v}"] = ((volume - mean) / std).mask(std == 0, 0.0)

    out = pd.DataFrame(columns, index=frame.index)[feature_names(spec)].iloc[warmup_rows(spec) :]
    values = out.to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise DataError(
            f"feature {out.columns[col]!r} is not a finite number at {out.index[row]} "
            f"({int(bad.sum())} such value(s)); check the bars' prices and volume there"
        )
    return out


@dataclass(frozen=True, slots=True)
class Standardizer:
    """Per-feature ``(x - mean) / std``; fitted on training rows only, saved as lists."""

    names: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, values: np.ndarray, names: list[str]) -> Standardizer:
        """Mean and population standard deviation (ddof 0) of each column of ``values``.

        A column whose std is below :data:`STD_FLOOR` gets std 1.
        """
        import numpy as np

        data = np.asarray(values, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] != len(names):
            raise ValueError(f"need a (rows, {len(names)}) array with rows, got shape {data.shape}")
        mean = data.mean(axis=0)
        std = data.std(axis=0, ddof=0)
        std = np.where(std < STD_FLOOR, 1.0, std)
        return cls(list(names), [float(m) for m in mean], [float(s) for s in std])

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scaled values as float32, the dtype the models take."""
        import numpy as np

        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        return ((np.asarray(values, dtype=np.float64) - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, list[Any]]:
        """Plain lists, for the model bundle."""
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Standardizer:
        """The Standardizer of :meth:`to_dict`."""
        return cls(
            [str(n) for n in saved["names"]],
            [float(m) for m in saved["mean"]],
            [float(s) for s in saved["std"]],
        )
