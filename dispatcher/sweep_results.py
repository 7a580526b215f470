"""A sweep's results as they come in: counts, ranking, best so far, and the final result.

:class:`Tally` holds one entry per finished combination (from the chunks' results, or
marked failed when its chunk failed as a whole) and derives everything a user sees from
them: the progress line, the leaderboard, the best-so-far curve, the objective surface of
a two-parameter grid, and the ``results`` Parquet table.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Mapping
from typing import Any

from runner.sweep.objective import Objective

#: The largest two-parameter grid whose objective surface the result carries.
MAX_SURFACE_CELLS = 10_000

Entry = dict[str, Any]


def describe(params: Mapping[str, Any]) -> str:
    """``fast=10, slow=30``."""
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


class Tally:
    """Every finished combination of one sweep, by index."""

    def __init__(self, objective: Objective, param_names: list[str], planned: int) -> None:
        self.objective = objective
        self.param_names = param_names
        self.planned = planned
        self.entries: dict[int, Entry] = {}
        self.started = time.monotonic()
        self._best: Entry | None = None

    def add(self, entries: Iterable[Entry]) -> list[Entry]:
        """Record finished entries (``index``, ``params``, ``metrics``, ``error``, ``child``);
        returns those that were new."""
        new: list[Entry] = []
        for entry in entries:
            index = int(entry["index"])
            if index in self.entries:
                continue
            self.entries[index] = entry
            new.append(entry)
            if self.objective.value(entry.get("metrics")) is not None and (
                self._best is None or self._sorts_before(entry, self._best)
            ):
                self._best = entry
        return new

    def _sorts_before(self, a: Entry, b: Entry) -> bool:
        return (self.objective.key(a.get("metrics")), a["index"]) < (
            self.objective.key(b.get("metrics")),
            b["index"],
        )

    def metrics_by_index(self) -> dict[int, Mapping[str, Any] | None]:
        """Each finished trial's metrics (None when it failed)."""
        return {i: e.get("metrics") for i, e in self.entries.items()}

    @property
    def best(self) -> Entry | None:
        """The best entry so far (lowest index among equals), None while none has a value."""
        return self._best

    def counts(self) -> dict[str, int]:
        """done, succeeded, failed and zero_trade."""
        failed = sum(1 for e in self.entries.values() if e.get("metrics") is None)
        zero = sum(1 for e in self.entries.values() if (e.get("metrics") or {}).get("total_trades", 1) == 0)
        done = len(self.entries)
        return {"done": done, "succeeded": done - failed, "failed": failed, "zero_trade": zero}

    def rate(self, done: int | None = None) -> float:
        """Combinations finished per second since the tally started."""
        elapsed = time.monotonic() - self.started
        count = len(self.entries) if done is None else done
        return count / elapsed if elapsed > 0 else 0.0

    def progress(
        self, in_flight: int = 0, children: tuple[int, int] = (0, 0)
    ) -> tuple[float, str, dict[str, float]]:
        """Percent, message and numbers of the sweep's progress; ``in_flight`` counts
        combinations running chunks report done that the tally does not hold yet."""
        counts = self.counts()
        done = counts["done"] + in_flight
        total = max(self.planned, done)
        rate = self.rate(done)
        numbers: dict[str, float] = {
            "done": done,
            "total": total,
            "combos_per_s": rate,
            "failed": counts["failed"],
            "children_done": children[0],
            "children_total": children[1],
        }
        message = f"{done}/{total} combinations, {rate:.0f}/s"
        best = self._best
        value = self.objective.value(best.get("metrics")) if best is not None else None
        if best is not None and value is not None:
            numbers["best"] = value
            message += f", best {self.objective.text}={value:.6g} ({describe(best['params'])})"
        percent = 100.0 * done / total if total else 0.0
        return min(percent, 100.0), message, numbers

    def ranked(self) -> list[Entry]:
        """Every entry, best first; undefined values last, ties by index."""
        return sorted(self.entries.values(), key=lambda e: (self.objective.key(e.get("metrics")), e["index"]))

    def leaderboard(
        self, top_k: int, validation: Mapping[int, Mapping[str, Any] | None] | None = None
    ) -> list[Entry]:
        """The ``top_k`` best entries that have a value, with rank, value and (when the
        sweep validated them) their out-of-sample metrics."""
        board: list[Entry] = []
        for entry in self.ranked():
            value = self.objective.value(entry.get("metrics"))
            if value is None or len(board) >= top_k:
                break
            row: Entry = {
                "rank": len(board) + 1,
                "index": entry["index"],
                "params": entry["params"],
                "value": value,
                "metrics": entry["metrics"],
                "child": entry.get("child", ""),
            }
            if validation is not None:
                row["validation"] = validation.get(entry["index"])
            board.append(row)
        return board

    def best_curve(self) -> list[list[float]]:
        """``[n, best value among the first n finished combinations]`` in index order,
        one point each time the best improves (and the last one)."""
        curve: list[list[float]] = []
        best: float | None = None
        n = 0
        for index in sorted(self.entries):
            n += 1
            value = self.objective.value(self.entries[index].get("metrics"))
            if value is not None and (best is None or self._key(value) < self._key(best)):
                best = value
                curve.append([n, best])
        if best is not None and curve[-1][0] != n:
            curve.append([n, best])
        return curve

    def _key(self, value: float) -> tuple[int, float]:
        return (0, value if self.objective.minimize else -value)

    def surface(self, axes: Mapping[str, list[Any]]) -> dict[str, Any] | None:
        """The objective over a two-parameter grid (``axes``: name to its values, x first)."""
        if len(axes) != 2:
            return None
        (x, xs), (y, ys) = axes.items()
        if len(xs) * len(ys) > MAX_SURFACE_CELLS:
            return None
        cells: dict[tuple[Any, Any], float | None] = {}
        for entry in self.entries.values():
            params = entry["params"]
            cells[(params.get(x), params.get(y))] = self.objective.value(entry.get("metrics"))
        values = [[cells.get((xv, yv)) for xv in xs] for yv in ys]
        return {"x": x, "y": y, "xs": list(xs), "ys": list(ys), "values": values}

    def parquet(self, metric_names: Iterable[str]) -> bytes:
        """One row per combination: index, child, each param, each metric, error."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [self.entries[i] for i in sorted(self.entries)]
        columns: dict[str, list[Any]] = {
            "index": [e["index"] for e in rows],
            "child": [e.get("child", "") for e in rows],
        }
        for name in self.param_names:
            columns[name] = [e["params"].get(name) for e in rows]
        for name in metric_names:
            columns[name] = [_number((e.get("metrics") or {}).get(name)) for e in rows]
        columns["error"] = [e.get("error") for e in rows]
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns), buffer)
        return buffer.getvalue()


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    return float(value) if isinstance(value, int | float) else None
