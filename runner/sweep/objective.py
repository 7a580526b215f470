"""What a sweep optimises: ``maximize`` (a backtest metric name, ``-name`` to minimise)
and the ranking of results by it, undefined values last."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from runner.errors import KtrdrRunnerError

DEFAULT_MAXIMIZE = "final_equity"

Entry = TypeVar("Entry", bound=Mapping[str, Any])


class ObjectiveError(KtrdrRunnerError, ValueError):
    """``maximize`` does not name a backtest metric."""


def metric_names() -> tuple[str, ...]:
    """The 24 metric names a backtest reports, in its order."""
    # Imported here: the metrics module needs numpy and this module must stay cheap.
    from runner.backtest.metrics import METRIC_NAMES

    return METRIC_NAMES


@dataclass(frozen=True, slots=True)
class Objective:
    """A metric to maximise (or, with ``minimize``, to minimise)."""

    metric: str
    minimize: bool = False

    @property
    def text(self) -> str:
        """The ``maximize`` string this objective parses from."""
        return f"-{self.metric}" if self.minimize else self.metric

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The metric's value in ``metrics`` as a finite float; None when undefined
        (missing, None, NaN or infinite, or ``metrics`` itself None: a failed run)."""
        if metrics is None:
            return None
        raw = metrics.get(self.metric)
        if raw is None or isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        number = float(raw)
        return number if math.isfinite(number) else None

    def key(self, metrics: Mapping[str, Any] | None) -> tuple[int, float]:
        """A sort key, ascending from best to worst; undefined values sort last."""
        number = self.value(metrics)
        if number is None:
            return (1, 0.0)
        return (0, number if self.minimize else -number)

    def better(self, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
        """Whether metrics ``a`` rank strictly before metrics ``b``."""
        return self.key(a) < self.key(b)


def parse_maximize(text: str) -> Objective:
    """Parse ``maximize``: a metric name, or ``-name`` to minimise it.

    Raises ObjectiveError listing the known metric names when ``text`` names none.
    """
    stripped = text.strip()
    minimize = stripped.startswith("-")
    metric = stripped[1:].strip() if minimize else stripped
    known = metric_names()
    if metric not in known:
        raise ObjectiveError(
            f"maximize {text!r}: unknown metric {metric!r}; known metrics: {', '.join(known)} "
            "(prefix one with - to minimise it)"
        )
    return Objective(metric=metric, minimize=minimize)


def rank(entries: Iterable[Entry], objective: Objective) -> list[Entry]:
    """``entries`` (each with a ``metrics`` mapping, None for a failed run) best first.

    Entries whose metric is undefined (a zero-trade run's Sharpe ratio, a failed run) come
    last; ties keep their input order.
    """
    return sorted(entries, key=lambda e: objective.key(e.get("metrics")))
