"""The vectorized backtest engine of ktrdr-run.

Modules:

- :mod:`runner.backtest.data` loads and validates OHLCV bars (KTRDR's
  ``{symbol}_{timeframe}.csv`` layout, or Parquet) into :class:`~runner.backtest.data.Bars`;
- :mod:`runner.backtest.strategies` turns bars into a target position per bar;
- :mod:`runner.backtest.engine` simulates fills, cash, units, equity and the trade list;
- :mod:`runner.backtest.metrics` computes the KTRDR-named performance metrics;
- :mod:`runner.backtest.demo` generates a deterministic, clearly synthetic demo data set.

The semantics are written down in ``docs/backtest.md``.
"""

# Shared by the params struct (runner.ops.backtest) and the loader: a symbol or timeframe
# becomes part of a file name, so neither may hold a path separator.
SYMBOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$"
TIMEFRAME_PATTERN = r"^[0-9]{1,4}[A-Za-z]{1,3}$"


def check_date_range(kind: str, start: str | None, end: str | None, *, prefix: str = "") -> None:
    """``start``/``end`` (ISO 8601, both inclusive; naive means UTC) parse and are in order;
    InvalidParams names the field (``prefix`` + ``start``/``end``). A date-only ``end``
    includes its whole day."""
    from datetime import UTC, datetime, timedelta

    from runner.errors import InvalidParams

    def parse(value: str, field: str) -> datetime:
        try:
            stamp = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidParams(kind, field, f"{value!r} is not an ISO 8601 date (e.g. 2024-01-31)") from None
        return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)

    first = parse(start, prefix + "start") if start else None
    last = parse(end, prefix + "end") if end else None
    if first is not None and last is not None and end is not None:
        date_only = len(end.strip()) == 10
        if (last + timedelta(days=1) <= first) if date_only else (last < first):
            raise InvalidParams(
                kind, prefix + "end", f"{prefix}end {end!r} is before {prefix}start {start!r}"
            )
