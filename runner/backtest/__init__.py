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
