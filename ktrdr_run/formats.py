"""How backtest metrics are shown, in the terminal and in the HTML report alike."""

from __future__ import annotations

from typing import Any

# Metrics that are fractions (0.12 = 12 %), shown as percentages in the table.
FRACTION_METRICS = frozenset(
    {
        "total_return_pct",
        "annualized_return",
        "volatility",
        "max_drawdown_pct",
        "win_rate",
        "exposure_pct",
        "buy_and_hold_return_pct",
    }
)
MONEY_METRICS = frozenset(
    {
        "total_return",
        "max_drawdown",
        "avg_win",
        "avg_loss",
        "largest_win",
        "largest_loss",
        "final_equity",
        "commissions_paid",
    }
)


def format_metric(name: str, value: Any) -> str:
    """A backtest metric as the CLI and the report show it: fractions as percentages,
    money with thousands separators, the holding period in hours."""
    if value is None:
        return "n/a"
    if name in FRACTION_METRICS:
        return f"{value * 100:,.2f} %"
    if name in MONEY_METRICS:
        return f"{value:,.2f}"
    if name == "avg_holding_period":
        return f"{value:,.1f} h"
    if isinstance(value, float):
        return f"{value:,.4f}"
    return f"{value:,}"
