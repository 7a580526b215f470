"""The one number that says how an op did, for the CLI's ops table and the dashboard:
Sharpe for backtests, the validation loss for training, the best objective value for a
sweep (``best final_equity`` so far while it runs)."""

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


def _sweep_best(record: OpRecord) -> tuple[str, float] | None:
    result = record.result or {}
    maximize = str(result.get("maximize") or record.params.get("maximize") or "final_equity")
    best = result.get("best")
    value = _number(best.get("value")) if isinstance(best, dict) else None
    if value is None and record.progress is not None:
        value = _number(record.progress.metrics.get("best"))
    return None if value is None else (maximize.lstrip("-"), value)


def headline_metric(record: OpRecord) -> tuple[str, float] | None:
    """(metric name, value) of the op's headline; None when there is none yet."""
    if record.kind == "sweep":
        return _sweep_best(record)
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
    if record.kind == "sweep":
        return f"best {name} {value:.4g}"
    return f"sharpe {value:.2f}" if name == "sharpe_ratio" else f"val_loss {value:.4g}"
