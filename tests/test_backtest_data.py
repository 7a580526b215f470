"""Data loading: KTRDR's layout, Parquet, and a clear error for each kind of bad data.

Every bad-data case is checked twice: through the loader the op uses and through
``runner.ops.backtest.preflight``, which the dispatcher calls before starting a container.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.backtest.data import load_bars
from runner.errors import DataError, InvalidParams
from runner.ops.backtest import BacktestParams, preflight


def _ktrdr_frame(n: int = 60, start: str = "2024-01-01", freq: str = "D") -> pd.DataFrame:
    index = pd.date_range(start, periods=n, freq=freq, tz="UTC", name="timestamp")
    close = 100 + np.sin(np.arange(n) / 3.0) * 5 + np.arange(n) * 0.1
    return pd.DataFrame(
        {
            "open": close - 0.2,
            "high": close + 1.0,
            "low": close - 1.0,
            "close": close,
            "volume": np.arange(n) * 10.0,
        },
        index=index,
    )


def _write_csv(directory: Path, frame: pd.DataFrame, name: str = "TEST_1d.csv") -> Path:
    path = directory / name
    frame.to_csv(path, date_format="%Y-%m-%dT%H:%M:%SZ")
    return path


def _write_text(directory: Path, text: str, name: str = "TEST_1d.csv") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _params(**kw: object) -> BacktestParams:
    base: dict[str, object] = {
        "strategy": "sma_cross",
        "symbol": "TEST",
        "timeframe": "1d",
        "strategy_params": {"fast": 3, "slow": 5},
    }
    base.update(kw)
    return BacktestParams(**base)  # type: ignore[arg-type]


def _load(directory: Path, params: BacktestParams) -> None:
    load_bars(
        directory,
        params.symbol,
        params.timeframe,
        start=params.start,
        end=params.end,
        warmup=int(params.strategy_params.get("slow", 0)),
        strategy="sma_cross",
    )


LOADERS: dict[str, Callable[[Path, BacktestParams], None]] = {
    "loader": _load,
    "preflight": lambda d, p: preflight(p, d),
}


# --- good data --------------------------------------------------------------------------


def test_reads_ktrdr_csv_layout(tmp_path: Path) -> None:
    frame = _ktrdr_frame()
    path = _write_csv(tmp_path, frame)
    assert path.read_text().splitlines()[1].startswith("2024-01-01T00:00:00Z,")
    bars = load_bars(tmp_path, "TEST", "1d")
    assert len(bars) == 60 and bars.source == str(path)
    assert bars.timestamps[0] == np.datetime64("2024-01-01T00:00:00", "ns")
    np.testing.assert_array_equal(bars.close, frame["close"].to_numpy())
    np.testing.assert_array_equal(bars.volume, frame["volume"].to_numpy())


def test_reads_real_market_data_round_trip(tmp_path: Path) -> None:
    goog = pytest.importorskip("backtesting.test").GOOG
    frame = goog.rename(columns=str.lower)
    frame.index = frame.index.tz_localize("UTC").rename("timestamp")
    _write_csv(tmp_path, frame, "GOOG_1d.csv")
    bars = load_bars(tmp_path, "GOOG", "1d", start="2005-01-01", end="2005-12-31")
    want = frame.loc["2005-01-01":"2005-12-31"]
    assert len(bars) == len(want) == 252
    np.testing.assert_array_equal(bars.open, want["open"].to_numpy())


def test_reads_parquet_with_index_or_column(tmp_path: Path) -> None:
    frame = _ktrdr_frame(n=30)
    frame.to_parquet(tmp_path / "IDX_1h.parquet")
    frame.reset_index().rename(columns=str.upper).to_parquet(tmp_path / "COL_1h.parquet")
    for symbol in ("IDX", "COL"):
        bars = load_bars(tmp_path, symbol, "1h")
        assert len(bars) == 30
        np.testing.assert_array_equal(bars.high, frame["high"].to_numpy())


def test_naive_and_offset_timestamps_are_utc(tmp_path: Path) -> None:
    text = (
        "date,Open,High,Low,Close,Volume\n"
        "2024-01-01 09:00:00,1,2,0.5,1.5,10\n"
        "2024-01-01T11:00:00+01:00,1,2,0.5,1.5,10\n"
        "2024-01-01T11:00:00Z,1,2,0.5,1.5,10\n"
    )
    _write_text(tmp_path, text, "FX_1h.csv")
    bars = load_bars(tmp_path, "FX", "1h")
    assert bars.timestamps.astype("datetime64[h]").astype(str).tolist() == [
        "2024-01-01T09",
        "2024-01-01T10",
        "2024-01-01T11",
    ]


def test_date_filter_is_inclusive(tmp_path: Path) -> None:
    _write_csv(tmp_path, _ktrdr_frame(n=24 * 10, freq="h"), "H_1h.csv")
    bars = load_bars(tmp_path, "H", "1h", start="2024-01-03", end="2024-01-04")
    assert len(bars) == 48  # the whole of both days
    bars = load_bars(tmp_path, "H", "1h", start="2024-01-03T05:00:00Z", end="2024-01-03T07:00:00Z")
    assert len(bars) == 3


def test_partial_overlap_keeps_the_bars_inside(tmp_path: Path) -> None:
    _write_csv(tmp_path, _ktrdr_frame(n=60))
    bars = load_bars(tmp_path, "TEST", "1d", start="2023-06-01", end="2024-01-10")
    assert len(bars) == 10


def test_preflight_accepts_good_data_and_demo(tmp_path: Path) -> None:
    _write_csv(tmp_path, _ktrdr_frame())
    preflight(_params(), tmp_path)
    preflight(_params(symbol="DEMO"), None)
    preflight(_params(symbol="DEMO", timeframe="1h"), tmp_path)


# --- bad data: each a DataError naming the file and the problem -------------------------

BAD_CASES: dict[str, tuple[Callable[[Path], Path | None], dict[str, object], str]] = {}


def _case(name: str, params: dict[str, object], match: str):
    def register(make: Callable[[Path], Path | None]) -> Callable[[Path], Path | None]:
        BAD_CASES[name] = (make, params, match)
        return make

    return register


@_case("missing_file", {}, r"TEST_1d\.csv: data file not found.*files for TEST: TEST_1h\.csv")
def _missing_file(d: Path) -> Path | None:
    _write_csv(d, _ktrdr_frame(), "TEST_1h.csv")
    return d / "TEST_1d.csv"


@_case("nan_price", {}, r"column 'close' has 1 missing or non-numeric price\(s\).*2024-01-11")
def _nan(d: Path) -> Path:
    frame = _ktrdr_frame()
    frame.iloc[10, frame.columns.get_loc("close")] = np.nan
    return _write_csv(d, frame)


@_case("non_numeric_price", {}, r"column 'open' has 1 missing or non-numeric.*2024-01-03")
def _text_price(d: Path) -> Path:
    frame = _ktrdr_frame().astype({"open": object})
    frame.iloc[2, 0] = "n/a"
    return _write_csv(d, frame)


@_case("zero_price", {}, r"column 'low' has 1 non-positive price\(s\).*2024-01-06.*0\.0")
def _zero(d: Path) -> Path:
    frame = _ktrdr_frame()
    frame.iloc[5, frame.columns.get_loc("low")] = 0.0
    return _write_csv(d, frame)


@_case("negative_price", {}, r"column 'high' has 2 non-positive price\(s\).*2024-01-08.*\(-1\.0\)")
def _negative(d: Path) -> Path:
    frame = _ktrdr_frame()
    frame.iloc[[7, 9], frame.columns.get_loc("high")] = -1.0
    return _write_csv(d, frame)


@_case("unsorted", {}, r"not sorted ascending: data row 6 \(2024-01-05T00:00:00Z\) comes after")
def _unsorted(d: Path) -> Path:
    frame = _ktrdr_frame()
    order = list(range(60))
    order[4], order[5] = 5, 4
    return _write_csv(d, frame.iloc[order])


@_case("duplicate", {}, r"duplicate timestamp 2024-01-08T00:00:00Z at data rows 8 and 9")
def _duplicate(d: Path) -> Path:
    frame = _ktrdr_frame()
    frame = pd.concat([frame.iloc[:8], frame.iloc[7:]])
    return _write_csv(d, frame)


@_case("bad_timestamp", {}, r"1 timestamp\(s\) are missing or not ISO 8601; first at data row 3")
def _bad_stamp(d: Path) -> Path:
    path = _write_csv(d, _ktrdr_frame())
    lines = path.read_text().splitlines()
    lines[3] = "yesterday" + lines[3][20:]
    path.write_text("\n".join(lines) + "\n")
    return path


@_case("missing_column", {}, r"missing column\(s\) volume")
def _no_volume(d: Path) -> Path:
    return _write_csv(d, _ktrdr_frame().drop(columns="volume"))


@_case("empty_file", {}, r"TEST_1d\.csv: the file is empty")
def _empty(d: Path) -> Path:
    return _write_text(d, "")


@_case(
    "range_after_data",
    {"start": "2030-01-01"},
    r"requested date range 2030-01-01\.\.\(end of data\) is outside the data, which covers "
    r"2024-01-01T00:00:00Z\.\.2024-02-29T00:00:00Z",
)
def _after(d: Path) -> Path:
    return _write_csv(d, _ktrdr_frame())


@_case("range_before_data", {"end": "2023-12-31"}, r"requested date range .* outside the data")
def _before(d: Path) -> Path:
    return _write_csv(d, _ktrdr_frame())


@_case(
    "too_few_bars_for_warmup",
    {"start": "2024-01-01", "end": "2024-01-06"},
    r"TEST_1d\.csv: 6 bar\(s\) in the requested range, but sma_cross.* needs at least 7",
)
def _short(d: Path) -> Path:
    return _write_csv(d, _ktrdr_frame())


@_case("no_data_dir", {}, r"data directory does not exist")
def _no_dir(d: Path) -> None:
    return None


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_gives_a_clear_error(tmp_path: Path, case: str, loader: str) -> None:
    make, extra, match = BAD_CASES[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = make(data_dir)
    if path is None:
        data_dir.rmdir()
    with pytest.raises(DataError, match=match) as info:
        LOADERS[loader](data_dir, _params(**extra))
    named = path if path is not None else data_dir
    assert str(named) in str(info.value), "the message names the file"


def test_no_data_dir_mounted_for_a_real_symbol() -> None:
    with pytest.raises(DataError, match=r"no data directory is mounted.*TEST_1d\.csv"):
        preflight(_params(), None)


def test_preflight_rejects_bad_strategy_params(tmp_path: Path) -> None:
    with pytest.raises(InvalidParams, match=r"params\.strategy_params\.slow"):
        preflight(_params(strategy_params={"fast": 3, "slow": "x"}), tmp_path)
    with pytest.raises(InvalidParams, match=r"params\.strategy: unknown strategy 'nope'"):
        preflight(_params(strategy="nope"), tmp_path)


def test_reversed_range_is_an_error(tmp_path: Path) -> None:
    _write_csv(tmp_path, _ktrdr_frame())
    with pytest.raises(DataError, match="start '2024-02-01' is after end '2024-01-01'"):
        load_bars(tmp_path, "TEST", "1d", start="2024-02-01", end="2024-01-01")


def test_symbol_cannot_escape_the_data_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a valid symbol"):
        load_bars(tmp_path, "../etc/passwd", "1d")
