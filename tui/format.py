"""How the dashboard words and colours things: states, progress, durations, metrics.

Pure functions of an :class:`OpRecord` (and the time now), so the table, the detail
screen and the tests agree on every figure shown.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.text import Text

from discovery.health import HostSnapshot
from ktrdr_run.charts import format_number
from runner.protocol import TERMINAL_STATES, OpRecord

#: Rich style of each op state.
STATE_STYLES: dict[str, str] = {
    "queued": "yellow",
    "placing": "cyan",
    "starting": "cyan",
    "running": "bold dodger_blue1",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "timed_out": "red",
    "lost": "dark_orange",
}
#: Lifecycle order of the states (what sorting by state follows).
STATE_ORDER: dict[str, int] = {state: index for index, state in enumerate(STATE_STYLES)}
#: Kinds whose headline metric is the validation loss.
GIB = 1024**3


def state_text(state: str) -> Text:
    """The state, coloured."""
    return Text(state, style=STATE_STYLES.get(state, ""))


def submitted_at(record: OpRecord) -> float:
    """When the op was first recorded (Unix seconds; 0 when unknown)."""
    return min(record.timestamps.values(), default=0.0)


def elapsed_s(record: OpRecord, now: float) -> float | None:
    """Seconds the op has run (from ``running``, else from submission) up to its end or
    ``now``; None when it has no timestamps."""
    if not record.timestamps:
        return None
    start = record.timestamps.get("running", submitted_at(record))
    if record.state in TERMINAL_STATES:
        end = record.timestamps.get(record.state, max(record.timestamps.values()))
    else:
        end = now
    return max(0.0, end - start)


def duration(seconds: float | None) -> str:
    """A short duration: ``4.2s``, ``3m07s``, ``2h05m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def percent_of(record: OpRecord) -> float:
    """The op's progress in percent (100 for a completed op that reported none)."""
    if record.progress is not None:
        return record.progress.percent
    return 100.0 if record.state == "completed" else 0.0


def progress_text(percent: float, width: int = 10) -> Text:
    """A small bar and the percentage: ``█████▌····  55%``."""
    percent = min(100.0, max(0.0, percent))
    eighths = round(percent / 100 * width * 8)
    full, part = divmod(eighths, 8)
    bar = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    bar = bar + "·" * (width - len(bar))
    text = Text()
    text.append(bar, style="dodger_blue1")
    text.append(f" {percent:3.0f}%")
    return text


def number(value: float) -> str:
    """A metric value, compactly."""
    return f"{value:.4g}"


def params_lines(params: dict[str, Any]) -> list[str]:
    """``key = value`` lines of an op's params (values as JSON)."""
    return [f"{key} = {json.dumps(value, default=str)}" for key, value in sorted(params.items())]


def capacity(free: float, total: float, unit: str = "") -> str:
    """``free/total`` with an optional unit."""
    return f"{free:g}/{total:g}{unit}"


def host_cells(host: HostSnapshot) -> tuple[str, str, Text, str, str, str, str]:
    """The hosts-panel cells of one host: name, source, state, CPUs, memory, GPUs, ops."""
    style = {"available": "green", "unhealthy": "bold red", "gone": "dim"}.get(host.state, "")
    memory = f"{host.free_memory_bytes / GIB:.1f}/{host.memory_bytes / GIB:.1f}"
    return (
        host.name,
        host.source,
        Text(host.state, style=style),
        capacity(round(host.free_cpus, 2), round(host.cpus, 2)),
        memory,
        capacity(host.free_gpus, len(host.gpus)),
        str(host.running_ops),
    )


#: Metrics that are counts (shown as whole numbers).
COUNT_METRICS = frozenset({"total_trades", "winning_trades", "losing_trades"})


def metric_value(name: str, value: Any) -> str:
    """A backtest metric as shown in a table: fractions named ``*_pct`` and ``win_rate`` in
    percent, counts whole, the rest compactly (``12,346``, ``1.27``, ``0.812``); ``-`` when
    undefined (missing, None, not finite)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    if not math.isfinite(value):
        return "-"
    if name in COUNT_METRICS:
        return str(round(value))
    if name.endswith("_pct") or name == "win_rate":
        return f"{value * 100:,.2f}%"
    return format_number(float(value))


def param_value(value: Any) -> str:
    """A parameter's value, compactly: ``10``, ``0.003``, ``ema``."""
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, default=str)
