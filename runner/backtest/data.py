"""Loading and validating OHLCV bars.

The layout is KTRDR's: one data directory holding ``{symbol}_{timeframe}.csv`` files whose
first column (or a column named ``timestamp``/``date``/``datetime``/``time``) is a UTC
timestamp (``%Y-%m-%dT%H:%M:%SZ``; any ISO 8601 form is accepted, naive times are read as
UTC) followed by ``open, high, low, close, volume`` (any letter case).
``{symbol}_{timeframe}.parquet`` is read the same way (a datetime index or a timestamp
column). When both exist, the CSV file is used.

Every problem is a :class:`runner.errors.DataError` whose message starts with the file and
says what is wrong: a missing file, unreadable content, missing columns, unparseable,
unsorted or duplicate timestamps, missing (NaN) or non-positive prices, a date range outside
the data, or fewer bars than the strategy's warm-up needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runner.backtest import SYMBOL_PATTERN, TIMEFRAME_PATTERN
from runner.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
REQUIRED_COLUMNS: tuple[str, ...] = (*PRICE_COLUMNS, "volume")
TIMESTAMP_COLUMNS: tuple[str, ...] = ("timestamp", "date", "datetime", "time")
SUFFIXES: tuple[str, ...] = (".csv", ".parquet")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True, eq=False)
class Bars:
    """OHLCV bars as contiguous float64 arrays, timestamps as UTC ``datetime64[ns]``."""

    timestamps: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.close.shape[0])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, source: str = "") -> Bars:
        """Bars from a frame with a DatetimeIndex and lower-case OHLCV columns.

        A tz-aware index is converted to UTC; a naive one is taken as UTC already.
        A missing ``volume`` column becomes zeros.
        """
        import pandas as pd

        index = pd.DatetimeIndex(frame.index)
        if index.tz is not None:
            index = index.tz_convert("UTC").tz_localize(None)
        stamps = index.as_unit("ns").to_numpy()

        def column(name: str) -> np.ndarray:
            if name not in frame.columns:
                return np.zeros(len(frame), dtype=np.float64)
            return np.ascontiguousarray(frame[name].to_numpy(dtype=np.float64))

        return cls(
            timestamps=stamps,
            open=column("open"),
            high=column("high"),
            low=column("low"),
            close=column("close"),
            volume=column("volume"),
            source=source,
        )

    def to_frame(self) -> pd.DataFrame:
        """The bars as a DataFrame with a UTC DatetimeIndex named ``timestamp``."""
        import pandas as pd

        index = pd.DatetimeIndex(self.timestamps, name="timestamp").tz_localize("UTC")
        return pd.DataFrame(
            {
                "open": self.open,
                "high": self.high,
                "low": self.low,
                "close": self.close,
                "volume": self.volume,
            },
            index=index,
        )


def format_timestamp(value: np.datetime64 | pd.Timestamp) -> str:
    """A timestamp in KTRDR's form, ``%Y-%m-%dT%H:%M:%SZ`` (UTC)."""
    import pandas as pd

    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_date(value: str, field: str, *, is_end: bool = False) -> pd.Timestamp:
    """Parse an ISO 8601 date or date-time as a UTC timestamp (naive input is UTC).

    A date-only ``end`` means the whole day: the returned bound is the start of the next
    day and is meant to be used exclusively (see :func:`select_range`). Raises DataError
    naming ``field`` when the value is not ISO 8601.
    """
    import pandas as pd

    text = value.strip()
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{field}: {value!r} is not an ISO 8601 date ({exc})") from None
    if stamp is pd.NaT:
        raise DataError(f"{field}: {value!r} is not an ISO 8601 date")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    if is_end and _DATE_ONLY.match(text):
        stamp = stamp + pd.Timedelta(days=1)
    return stamp


def find_data_file(data_dir: Path, symbol: str, timeframe: str) -> Path:
    """The data file of ``symbol`` at ``timeframe`` in ``data_dir``.

    Raises DataError when the directory or the file does not exist; the message lists the
    files that do exist for the symbol, if any.
    """
    if not re.fullmatch(SYMBOL_PATTERN.rstrip("$"), symbol):
        raise DataError(f"symbol {symbol!r} is not a valid symbol (pattern {SYMBOL_PATTERN})")
    if not re.fullmatch(TIMEFRAME_PATTERN.rstrip("$"), timeframe):
        raise DataError(f"timeframe {timeframe!r} is not a valid timeframe (e.g. 1d, 1h, 5m)")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist or is not a directory")
    for suffix in SUFFIXES:
        candidate = directory / f"{symbol}_{timeframe}{suffix}"
        if candidate.is_file():
            return candidate
    expected = directory / f"{symbol}_{timeframe}.csv"
    others = sorted(p.name for p in directory.glob(f"{symbol}_*") if p.suffix in SUFFIXES and p.is_file())
    hint = f"; files for {symbol}: {', '.join(others)}" if others else ""
    raise DataError(f"{expected}: data file not found (nor its .parquet form){hint}")


def read_bars_file(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet bars file into a frame with a UTC DatetimeIndex.

    Columns are lower-cased and prices made numeric (non-numeric cells become NaN, which
    :func:`validate_prices` reports). Unparseable timestamps and missing columns raise
    DataError naming the file.
    """
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            if isinstance(frame.index, pd.DatetimeIndex):
                frame = frame.reset_index(names="timestamp")
        else:
            frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None
    if frame.shape[1] == 0 or len(frame) == 0:
        raise DataError(f"{path}: the file holds no rows of data")

    frame.columns = [str(c).strip().lower() for c in frame.columns]
    time_col = next((c for c in TIMESTAMP_COLUMNS if c in frame.columns), frame.columns[0])
    if time_col in REQUIRED_COLUMNS:
        raise DataError(f"{path}: no timestamp column (first column is {time_col!r})")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")

    index = _parse_timestamps(frame[time_col], path)
    data = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64) for c in PRICE_COLUMNS}
    data["volume"] = pd.to_numeric(frame["volume"], errors="coerce").to_numpy(np.float64)
    return pd.DataFrame(data, index=index)


def _parse_timestamps(values: pd.Series, path: Path) -> pd.DatetimeIndex:
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = pd.to_datetime(values, utc=True)
    elif pd.api.types.is_numeric_dtype(values.dtype):
        raise DataError(
            f"{path}: timestamps must be ISO 8601 date/times (e.g. 2024-01-02T00:00:00Z), "
            f"got numbers such as {values.iloc[0]!r}"
        )
    else:
        parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: {bad.size} timestamp(s) are missing or not ISO 8601; first at data row "
            f"{row + 1}: {values.iloc[row]!r}"
        )
    return pd.DatetimeIndex(parsed, name="timestamp").as_unit("ns")


def validate_order(frame: pd.DataFrame, path: Path) -> None:
    """Raise DataError unless the timestamps are strictly increasing (sorted, no duplicates)."""
    index = frame.index
    ns = np.asarray(index.as_unit("ns").asi8)
    if ns.size < 2:
        return
    step = np.diff(ns)
    backwards = np.flatnonzero(step < 0)
    if backwards.size:
        i = int(backwards[0])
        raise DataError(
            f"{path}: timestamps are not sorted ascending: data row {i + 2} "
            f"({format_timestamp(index[i + 1])}) comes after data row {i + 1} "
            f"({format_timestamp(index[i])}); {backwards.size} such place(s)"
        )
    dupes = np.flatnonzero(step == 0)
    if dupes.size:
        i = int(dupes[0])
        raise DataError(
            f"{path}: duplicate timestamp {format_timestamp(index[i])} at data rows {i + 1} "
            f"and {i + 2}; {dupes.size} duplicate(s) in all"
        )


def select_range(
    frame: pd.DataFrame, path: Path, start: str | None = None, end: str | None = None
) -> pd.DataFrame:
    """The rows of ``frame`` from ``start`` to ``end`` (ISO dates, both inclusive).

    A date-only ``end`` includes that whole day. Raises DataError when the range is
    reversed or holds no bar of the file (the message gives the file's own range).
    """
    lo = parse_date(start, "start") if start else None
    hi = parse_date(end, "end", is_end=True) if end else None
    end_exclusive = bool(end and _DATE_ONLY.match(end.strip()))
    if lo is not None and hi is not None and (hi <= lo if end_exclusive else hi < lo):
        raise DataError(f"start {start!r} is after end {end!r}")
    index = frame.index
    mask = np.ones(len(frame), dtype=bool)
    if lo is not None:
        mask &= index >= lo
    if hi is not None:
        mask &= (index < hi) if end_exclusive else (index <= hi)
    if not mask.any():
        covers = f"{format_timestamp(index[0])}..{format_timestamp(index[-1])}"
        asked = f"{start or '(start of data)'}..{end or '(end of data)'}"
        raise DataError(f"{path}: requested date range {asked} is outside the data, which covers {covers}")
    return frame.loc[mask] if not mask.all() else frame


def validate_prices(frame: pd.DataFrame, path: Path) -> None:
    """Raise DataError on a missing (NaN, non-numeric, infinite) or non-positive price."""
    for name in PRICE_COLUMNS:
        values = frame[name].to_numpy(np.float64)
        missing = np.flatnonzero(~np.isfinite(values))
        if missing.size:
            i = int(missing[0])
            raise DataError(
                f"{path}: column {name!r} has {missing.size} missing or non-numeric price(s) "
                f"(NaN); first at {format_timestamp(frame.index[i])}"
            )
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{path}: column {name!r} has {bad.size} non-positive price(s); first at "
                f"{format_timestamp(frame.index[i])} ({float(values[i])!r})"
            )


def min_bars(warmup: int) -> int:
    """Bars a backtest needs: the warm-up, one bar to decide on and one to fill at."""
    return warmup + 2


def check_warmup(n_bars: int, warmup: int, path: Path | str, strategy: str) -> None:
    """Raise DataError when ``n_bars`` cannot cover ``strategy``'s warm-up."""
    need = min_bars(warmup)
    if n_bars < need:
        raise DataError(
            f"{path}: {n_bars} bar(s) in the requested range, but {strategy} needs at least "
            f"{need} (warm-up of {warmup} bars, then one bar to decide on and one to fill at)"
        )


def load_bars(
    data_dir: Path,
    symbol: str,
    timeframe: str,
    *,
    start: str | None = None,
    end: str | None = None,
    warmup: int = 0,
    strategy: str = "the strategy",
) -> Bars:
    """Find, read and validate the bars of ``symbol`` at ``timeframe`` in ``data_dir``.

    Checks, in order: the file exists and is readable, required columns are present,
    timestamps parse, are sorted and unique, the requested range overlaps the data, the
    prices in that range are finite and positive, and the range holds enough bars for a
    strategy with ``warmup`` bars of warm-up. Each failure raises DataError naming the file.
    """
    path = find_data_file(data_dir, symbol, timeframe)
    return load_bars_file(path, start=start, end=end, warmup=warmup, strategy=strategy)


def load_bars_file(
    path: Path,
    *,
    start: str | None = None,
    end: str | None = None,
    warmup: int = 0,
    strategy: str = "the strategy",
) -> Bars:
    """Like :func:`load_bars`, for a known file path."""
    frame = read_bars_file(path)
    return bars_from_frame(frame, path, start=start, end=end, warmup=warmup, strategy=strategy)


def bars_from_frame(
    frame: pd.DataFrame,
    path: Path | str,
    *,
    start: str | None = None,
    end: str | None = None,
    warmup: int = 0,
    strategy: str = "the strategy",
) -> Bars:
    """Validate an already-read frame (UTC DatetimeIndex, OHLCV columns) into Bars.

    ``path`` only names the data in error messages. Runs the ordering, range, price and
    warm-up checks of :func:`load_bars`.
    """
    where = Path(path)
    validate_order(frame, where)
    frame = select_range(frame, where, start, end)
    validate_prices(frame, where)
    check_warmup(len(frame), warmup, where, strategy)
    return Bars.from_frame(frame, source=str(path))
