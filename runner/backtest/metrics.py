"""Performance metrics, named as KTRDR names them so its tools read them unchanged.

Units follow KTRDR: currency amounts are in the account currency; every rate and every
``*_pct`` value is a **decimal fraction** (0.12 means 12 %), as in KTRDR's
``PerformanceMetrics``; ``avg_holding_period`` is in hours. Values that are undefined
(a ratio over zero, an empty set where KTRDR has no convention) are ``None``.

With ``E`` the equity per bar (``E[0]`` the initial capital, since bar 0 is always flat),
``r[t] = E[t] / E[t-1] - 1`` the ``N-1`` per-bar returns and ``P`` the periods per year
(:func:`periods_per_year`), the definitions are in ``docs/backtest.md`` and beside each
metric below.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from runner.backtest.engine import BacktestResult, Trades

METRIC_NAMES: tuple[str, ...] = (
    "total_return",
    "total_return_pct",
    "annualized_return",
    "volatility",
    "sharpe_ratio",
    "sortino_ratio",
    "calmar_ratio",
    "max_drawdown",
    "max_drawdown_pct",
    "total_trades",
    "winning_trades",
    "losing_trades",
    "win_rate",
    "profit_factor",
    "avg_win",
    "avg_loss",
    "largest_win",
    "largest_loss",
    "avg_holding_period",
    "exposure_pct",
    "final_equity",
    "buy_and_hold_return_pct",
    "recovery_factor",
    "commissions_paid",
)

_DAY_NS = 86_400 * 10**9
_HOUR_NS = 3_600 * 10**9


def periods_per_year(timestamps: np.ndarray) -> float:
    """Bars per year implied by the bar spacing (the annualisation factor ``P``).

    With ``Δ`` the median spacing between bars: ``Δ ≥ 28 days`` → 12 (monthly),
    ``Δ ≥ 5 days`` → 52 (weekly); otherwise ``D * B``, where ``D`` is 365 when more than
    a tenth of the bars fall on a Saturday or Sunday (markets trading every day) and 252
    otherwise, and ``B`` is the median number of bars per UTC calendar day that has bars
    (1 for daily data, 24 for around-the-clock hourly data, 7 for a 6.5-hour session of
    hourly bars). Fewer than two bars → 252.
    """
    stamps = np.asarray(timestamps).astype("datetime64[ns]").astype(np.int64)
    if stamps.shape[0] < 2:
        return 252.0
    spacing = float(np.median(np.diff(stamps)))
    if spacing >= 28 * _DAY_NS:
        return 12.0
    if spacing >= 5 * _DAY_NS:
        return 52.0
    days = stamps // _DAY_NS
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    year_days = 365.0 if np.mean(weekday >= 5) > 0.1 else 252.0
    if np.all(days[1:] >= days[:-1]):
        starts = np.flatnonzero(np.diff(days)) + 1  # sorted bars: count runs of equal days
        per_day = np.diff(np.concatenate(([0], starts, [days.shape[0]])))
    else:
        _, per_day = np.unique(days, return_counts=True)
    return year_days * float(np.median(per_day))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float | None:
    if den == 0 or not math.isfinite(den) or not math.isfinite(num):
        return None
    return _finite_or_none(num / den)


def equity_metrics(equity: np.ndarray, initial_capital: float, periods: float) -> dict[str, float | None]:
    """The metrics that depend only on the equity curve (see the module docstring)."""
    eq = np.asarray(equity, dtype=np.float64)
    final = float(eq[-1])
    total_return = final - initial_capital  # currency
    growth = final / initial_capital
    n_returns = eq.shape[0] - 1

    # annualized_return: compound growth per bar, compounded over P bars.
    if n_returns >= 1 and growth > 0:
        annualized: float | None = _finite_or_none(growth ** (periods / n_returns) - 1.0)
    elif n_returns >= 1:
        annualized = -1.0
    else:
        annualized = None

    with np.errstate(divide="ignore", invalid="ignore"):
        returns = eq[1:] / eq[:-1] - 1.0
    returns = returns[np.isfinite(returns)]
    root_p = math.sqrt(periods)
    volatility = sharpe = sortino = None
    if returns.shape[0] >= 2:
        std = float(np.std(returns, ddof=1))  # sample standard deviation
        mean = float(np.mean(returns))
        volatility = _finite_or_none(std * root_p)
        sharpe = _ratio(mean * root_p, std)
        downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
        sortino = _ratio(mean * root_p, downside)

    peak = np.maximum.accumulate(eq)
    drawdown = peak - eq
    max_dd = float(drawdown.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        max_dd_pct = float(np.max(np.where(peak > 0, drawdown / peak, 0.0)))

    return {
        "total_return": total_return,
        "total_return_pct": total_return / initial_capital,
        "annualized_return": annualized,
        "volatility": volatility,
        "sharpe_ratio": sharpe,
        "sortino_ratio": sortino,
        "calmar_ratio": _ratio(annualized, max_dd_pct) if annualized is not None else None,
        "max_drawdown": max_dd,
        "max_drawdown_pct": max_dd_pct,
        "final_equity": final,
        "recovery_factor": _ratio(total_return, max_dd),
    }


def trade_metrics(trades: Trades, timestamps: np.ndarray) -> dict[str, float | int | None]:
    """The metrics over closed trades (a position still open at the end is not counted).

    As in KTRDR, with no trades (or no winners/losers) the averages, extremes and the
    win rate are 0; ``profit_factor`` is ``None`` when there is no loss to divide by.
    """
    closed = trades.closed
    pnl = closed.pnl
    wins = pnl[pnl > 0]
    losses = pnl[pnl < 0]
    total = int(pnl.shape[0])
    gross_win = float(wins.sum())
    gross_loss = float(-losses.sum())
    stamps = np.asarray(timestamps).astype("datetime64[ns]").astype(np.int64)
    if total:
        held_ns = stamps[closed.exit_bar] - stamps[closed.entry_bar]
        avg_hold: float = float(np.mean(held_ns)) / _HOUR_NS
    else:
        avg_hold = 0.0
    return {
        "total_trades": total,
        "winning_trades": int(wins.shape[0]),
        "losing_trades": int(losses.shape[0]),
        "win_rate": wins.shape[0] / total if total else 0.0,
        "profit_factor": _ratio(gross_win, gross_loss),
        "avg_win": float(wins.mean()) if wins.shape[0] else 0.0,
        "avg_loss": float(losses.mean()) if losses.shape[0] else 0.0,
        "largest_win": float(wins.max()) if wins.shape[0] else 0.0,
        "largest_loss": float(losses.min()) if losses.shape[0] else 0.0,
        "avg_holding_period": avg_hold,
    }


def compute_metrics(result: BacktestResult, *, periods: float | None = None) -> dict[str, float | int | None]:
    """Every metric in :data:`METRIC_NAMES` for one backtest, as JSON-ready builtins.

    ``periods`` overrides the annualisation factor inferred by :func:`periods_per_year`.
    """
    bars = result.bars
    p = float(periods) if periods else periods_per_year(bars.timestamps)
    out: dict[str, Any] = {}
    out.update(equity_metrics(result.equity, result.config.initial_capital, p))
    out.update(trade_metrics(result.trades, bars.timestamps))
    out["exposure_pct"] = float(np.mean(result.units != 0))
    out["buy_and_hold_return_pct"] = float(bars.close[-1] / bars.close[0] - 1.0)
    out["commissions_paid"] = float(result.commissions_paid)
    return {name: clean(out[name]) for name in METRIC_NAMES}


def clean(value: Any) -> Any:
    """A JSON-ready builtin: numpy scalars unwrapped, NaN and infinities as ``None``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value
