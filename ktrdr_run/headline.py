"""The one number that says how an op did, for the CLI's ops table and the dashboard:
Sharpe for backtests, the validation loss for training."""

from __future__ import annotations

import math
from typing import Any

from runner.protocol import OpRecord

#: Kinds whose headline is the validation loss.
TRAINING_KINDS = frozenset({"train"})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _lookup(record: OpRecord, name: str) -> float | None:
    """``name`` from the result's metrics (a training result's best validation loss for
    ``val_loss``), the result itself, then the last progress."""
    result = record.result or {}
    sources: list[Any] = [result.get("metrics"), result]
    if name == "val_loss":
        training = result.get("training_metrics")
        if isinstance(training, dict):
            sources.insert(0, {"val_loss": training.get("best_val_loss")})
    for source in sources:
        if isinstance(source, dict):
            value = _number(source.get(name))
            if value is not None:
                return value
    if record.progress is not None:
        return _number(record.progress.metrics.get(name))
    return None


def headline_metric(record: OpRecord) -> tuple[str, float] | None:
    """(metric name, value) of the op's headline; None when there is none yet."""
    order = ("val_loss", "sharpe_ratio") if record.kind in TRAINING_KINDS else ("sharpe_ratio", "val_loss")
    for name in order:
        value = _lookup(record, name)
        if value is not None:
            return name, value
    return None


def metric_text(record: OpRecord) -> str:
    """The headline as shown: ``sharpe 1.27`` / ``val_loss 0.0412`` ("" when none)."""
    found = headline_metric(record)
    if found is None:
        return ""
    name, value = found
    return f"sharpe {value:.2f}" if name == "sharpe_ratio" else f"val_loss {value:.4g}"
