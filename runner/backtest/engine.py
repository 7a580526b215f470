"""The simulation: target positions to fills, cash, units, equity and the trade list.

Semantics (see ``docs/backtest.md``):

- ``target[t]`` (-1/0/1) is decided on bar ``t``'s close and filled at bar ``t+1``'s open;
  the target of the last bar is never filled. Bar 0 is always flat.
- The engine acts when the target changes. It first closes the open position (if any),
  then opens the new one (if the new target is not flat). A change long to short is a
  close and an open on the same bar, at the same open price.
- Fill prices carry slippage against the trade: buying fills at ``open·(1+slippage)``,
  selling at ``open·(1-slippage)``. Commission is ``commission · units · fill price`` on
  every fill (entry and exit).
- Sizing, in whole units: ``all_in`` buys (or sells short) as many units as the cash
  allows after commission, ``cash // (fill·(1+commission))``; ``fraction`` does the
  same with ``fraction · cash``. Sizing happens when flat (after the close), so the cash
  is the equity. An entry that cannot afford one unit is skipped.
- Equity on bar ``t`` is ``cash + units · close[t]``. A position still open after the last
  bar is marked to market at the last close (no exit commission), or, with
  ``close_at_end``, sold/bought back at the last close with slippage and commission.
- Ruin: when equity is at or below zero on a bar's close (a short that ran away, or a gap
  through the open), the position is closed at that close and equity is 0 from that bar
  on; nothing trades afterwards (``BacktestResult.ruined_at`` holds the bar).

The per-bar work is vectorized; the only Python loop runs over the bars where the
target changes (the fills), which is needed because each entry's size depends on the cash
left by the previous trade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from runner.backtest.data import Bars

Sizing = Literal["all_in", "fraction"]

TRADE_COLUMNS: tuple[str, ...] = (
    "entry_bar",
    "exit_bar",
    "direction",
    "units",
    "entry_price",
    "exit_price",
    "entry_commission",
    "exit_commission",
    "pnl",
    "return_pct",
    "is_open",
)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How fills, costs and sizing work. Rates are fractions (0.001 = 0.1 %)."""

    initial_capital: float = 100_000.0
    commission: float = 0.001
    slippage: float = 0.0005
    sizing: Sizing = "all_in"
    fraction: float = 1.0
    close_at_end: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial_capital) and self.initial_capital > 0):
            raise ValueError(f"initial_capital must be positive, got {self.initial_capital!r}")
        if not 0 <= self.commission < 1:
            raise ValueError(f"commission must be in [0, 1), got {self.commission!r}")
        if not 0 <= self.slippage < 1:
            raise ValueError(f"slippage must be in [0, 1), got {self.slippage!r}")
        if self.sizing not in ("all_in", "fraction"):
            raise ValueError(f"sizing must be 'all_in' or 'fraction', got {self.sizing!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")


@dataclass(frozen=True, slots=True, eq=False)
class Trades:
    """The trade list, one array per column (all the same length).

    ``entry_bar``/``exit_bar`` are the bar indices of the fills (the exit of a trade
    closed at the end is the last bar), ``direction`` is +1 long / -1 short, ``units`` is
    positive, prices are fill prices (slippage included), ``pnl`` is net of both
    commissions, ``return_pct`` is ``pnl / (units · entry_price)`` as a fraction.
    ``is_open`` marks a position still open at the end: its exit is the mark at the last
    close and its exit commission is zero.
    """

    entry_bar: np.ndarray
    exit_bar: np.ndarray
    direction: np.ndarray
    units: np.ndarray
    entry_price: np.ndarray
    exit_price: np.ndarray
    entry_commission: np.ndarray
    exit_commission: np.ndarray
    pnl: np.ndarray
    return_pct: np.ndarray
    is_open: np.ndarray

    def __len__(self) -> int:
        return int(self.entry_bar.shape[0])

    @property
    def closed(self) -> Trades:
        """Only the closed trades (what the trade metrics count)."""
        keep = ~self.is_open
        return Trades(**{c: getattr(self, c)[keep] for c in TRADE_COLUMNS})

    def columns(self) -> dict[str, np.ndarray]:
        """Column name to array."""
        return {c: getattr(self, c) for c in TRADE_COLUMNS}


@dataclass(frozen=True, slots=True, eq=False)
class BacktestResult:
    """What a simulation produced: per-bar arrays and the trade list."""

    bars: Bars
    config: EngineConfig
    target: np.ndarray
    position: np.ndarray
    units: np.ndarray
    cash: np.ndarray
    equity: np.ndarray
    trades: Trades
    commissions_paid: float
    ruined_at: int | None = None

    @property
    def final_equity(self) -> float:
        """Equity after the last bar."""
        return float(self.equity[-1])


def _validate_target(target: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(target)
    if arr.shape != (n,):
        raise ValueError(f"target must have one value per bar ({n}), got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("target contains NaN or infinite values")
    as_int = arr.astype(np.int8)
    if not np.array_equal(as_int, arr) or np.any(np.abs(as_int) > 1):
        raise ValueError("target values must be -1, 0 or 1")
    return as_int


def simulate(bars: Bars, target: np.ndarray, config: EngineConfig | None = None) -> BacktestResult:
    """Run the backtest of ``target`` positions over ``bars`` (see the module docstring)."""
    cfg = config or EngineConfig()
    n = len(bars)
    if n < 1:
        raise ValueError("no bars to backtest")
    tgt = _validate_target(target, n)

    # desired[t]: the position the strategy wants held from bar t's open.
    desired = np.zeros(n, dtype=np.int8)
    desired[1:] = tgt[:-1]
    change_bars = np.flatnonzero(desired[1:] != desired[:-1]) + 1

    change_list = change_bars.tolist()
    opens = bars.open[change_bars].tolist()
    wanted = desired[change_bars].tolist()
    book = _fill(change_list, opens, wanted, cfg)
    units_bar, cash_bar = _per_bar(n, change_bars, book, cfg.initial_capital)
    close = bars.close
    equity = cash_bar + units_bar * close

    # Ruin: equity at or below zero on a close ends the run (a short that ran away, or a
    # flat account after a gap through an exit). Rare: replay the fills up to that bar.
    below = np.flatnonzero(equity <= 0)
    ruin_bar = int(below[0]) if below.size else -1
    if ruin_bar >= 0:
        k = int(np.searchsorted(change_bars, ruin_bar, side="right"))
        book = _fill(change_list[:k], opens[:k], wanted[:k], cfg)
        units_bar, cash_bar = _per_bar(n, change_bars[:k], book, cfg.initial_capital)
        equity = cash_bar + units_bar * close

    commission = float(cfg.commission)
    slippage = float(cfg.slippage)
    rows = book.rows
    units = book.units
    entry_bar, entry_price, entry_comm = book.entry_bar, book.entry_price, book.entry_comm
    cash = book.cash

    last = n - 1
    if ruin_bar >= 0:
        # The account is wiped out: close at this bar's close, equity 0 from here on.
        if units != 0:
            direction = 1 if units > 0 else -1
            size = abs(units)
            fill = float(close[ruin_bar]) * (1.0 - direction * slippage)
            comm = commission * size * fill
            rows.append((entry_bar, ruin_bar, direction, size, entry_price, fill, entry_comm, comm))
        units = 0
        units_bar[ruin_bar + 1 :] = 0
        cash_bar[ruin_bar:] = 0.0
        equity[ruin_bar:] = 0.0
    elif units != 0:
        direction = 1 if units > 0 else -1
        size = abs(units)
        if cfg.close_at_end:
            fill = float(close[last]) * (1.0 - direction * slippage)
            comm = commission * size * fill
            cash += units * fill - comm
            rows.append((entry_bar, last, direction, size, entry_price, fill, entry_comm, comm))
            cash_bar[last] = cash
            equity[last] = cash
        else:
            mark = float(close[last])
            rows.append((entry_bar, last, direction, size, entry_price, mark, entry_comm, 0.0))

    open_last = bool(units != 0 and not cfg.close_at_end)
    trades = _trades_from_rows(rows, open_last=open_last)
    commissions_paid = float(trades.entry_commission.sum() + trades.exit_commission.sum())
    return BacktestResult(
        bars=bars,
        config=cfg,
        target=tgt,
        position=np.sign(units_bar).astype(np.int8),
        units=units_bar,
        cash=cash_bar,
        equity=equity,
        trades=trades,
        commissions_paid=commissions_paid,
        ruined_at=ruin_bar if ruin_bar >= 0 else None,
    )


@dataclass(slots=True)
class _Book:
    """The account while the fills are replayed."""

    cash: float
    units: int = 0  # signed whole units
    entry_bar: int = 0
    entry_price: float = 0.0
    entry_comm: float = 0.0
    rows: list[tuple[int, int, int, int, float, float, float, float]] = field(default_factory=list)
    units_after: list[int] = field(default_factory=list)
    cash_after: list[float] = field(default_factory=list)


def _fill(change_bars: list[int], opens: list[float], wanted: list[int], cfg: EngineConfig) -> _Book:
    """Replay the fills at the bars where the target changes: close, then open."""
    commission = float(cfg.commission)
    slippage = float(cfg.slippage)
    budget_share = 1.0 if cfg.sizing == "all_in" else float(cfg.fraction)
    book = _Book(cash=float(cfg.initial_capital))
    cash, units = book.cash, 0
    entry_bar, entry_price, entry_comm = 0, 0.0, 0.0
    rows, units_after, cash_after = book.rows, book.units_after, book.cash_after
    for bar, price, want in zip(change_bars, opens, wanted, strict=True):
        if units != 0:
            direction = 1 if units > 0 else -1
            fill = price * (1.0 - direction * slippage)
            size = abs(units)
            comm = commission * size * fill
            cash += units * fill - comm
            rows.append((entry_bar, bar, direction, size, entry_price, fill, entry_comm, comm))
            units = 0
        if want != 0 and cash > 0:
            fill = price * (1.0 + want * slippage)
            size = int((budget_share * cash) // (fill * (1.0 + commission)))
            if size >= 1:
                comm = commission * size * fill
                units = want * size
                cash -= units * fill + comm
                entry_bar, entry_price, entry_comm = bar, fill, comm
        units_after.append(units)
        cash_after.append(cash)
    book.cash, book.units = cash, units
    book.entry_bar, book.entry_price, book.entry_comm = entry_bar, entry_price, entry_comm
    return book


def _per_bar(n: int, change_bars: np.ndarray, book: _Book, initial: float) -> tuple[np.ndarray, np.ndarray]:
    """Units and cash per bar: constant between fills, so forward-fill the fill states."""
    seg = np.zeros(n, dtype=np.int64)
    seg[change_bars] = np.arange(1, change_bars.shape[0] + 1)
    np.maximum.accumulate(seg, out=seg)
    units_bar = np.asarray([0, *book.units_after], dtype=np.int64)[seg]
    cash_bar = np.asarray([float(initial), *book.cash_after], dtype=np.float64)[seg]
    return units_bar, cash_bar


def _trades_from_rows(
    rows: list[tuple[int, int, int, int, float, float, float, float]], *, open_last: bool
) -> Trades:
    k = len(rows)
    if k:
        eb, xb, d, u, ep, xp, ec, xc = (np.asarray(col) for col in zip(*rows, strict=True))
    else:
        eb = xb = d = u = np.zeros(0, dtype=np.int64)
        ep = xp = ec = xc = np.zeros(0, dtype=np.float64)
    entry_bar = eb.astype(np.int64)
    exit_bar = xb.astype(np.int64)
    direction = d.astype(np.int8)
    units = u.astype(np.int64)
    entry_price = ep.astype(np.float64)
    exit_price = xp.astype(np.float64)
    entry_commission = ec.astype(np.float64)
    exit_commission = xc.astype(np.float64)
    pnl = direction * units * (exit_price - entry_price) - entry_commission - exit_commission
    with np.errstate(invalid="ignore", divide="ignore"):
        return_pct = pnl / (units * entry_price)
    is_open = np.zeros(k, dtype=bool)
    if open_last and k:
        is_open[-1] = True
    return Trades(
        entry_bar=entry_bar,
        exit_bar=exit_bar,
        direction=direction,
        units=units,
        entry_price=entry_price,
        exit_price=exit_price,
        entry_commission=entry_commission,
        exit_commission=exit_commission,
        pnl=pnl,
        return_pct=return_pct,
        is_open=is_open,
    )
