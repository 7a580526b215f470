"""A sweep's child ops: their ids, how combinations are cut into chunks, and the
``sweep_chunk`` job of each.

A chunk child's id names the span of trial indexes it runs (``<parent>-<first>n<count>``),
so whoever coordinates the sweep next can tell from the parent's list of children which
combinations are covered, even for children whose job was never published.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable
from typing import Any

import msgspec

from discovery.base import Host
from dispatcher.placement import Placement, need_of
from dispatcher.sweep_trials import Trial
from runner.ops.backtest import BacktestParams
from runner.ops.sweep import SweepParams
from runner.ops.sweep_chunk import KIND as CHUNK_KIND
from runner.ops.sweep_chunk import MAX_CHUNK
from runner.protocol import Job, OpRecord, Resources

#: The fewest combinations a chunk gets when the capacity alone would split finer:
#: a container start costs about as much as this many backtests.
MIN_CHUNK = 32
#: The backtest settings a chunk takes from its sweep.
CHUNK_SETTINGS = frozenset(BacktestParams.__struct_fields__)
#: What a chunk's result says of the settings every chunk shares.
SHARED_RESULT_FIELDS = (
    "symbol",
    "timeframe",
    "strategy",
    "settings",
    "period",
    "bars",
    "data_source",
    "synthetic_data",
    "periods_per_year",
)


def child_prefix(parent_id: str) -> str:
    """The start of every child id of a parent, short enough for the id limit (80)."""
    if len(parent_id) <= 56:
        return parent_id
    return f"{parent_id[:47]}-{hashlib.sha256(parent_id.encode()).hexdigest()[:8]}"


def chunk_id(parent_id: str, first: int, count: int) -> str:
    """The id of the child that runs trials ``first`` .. ``first + count - 1``."""
    return f"{child_prefix(parent_id)}-{first}n{count}"


def validation_id(parent_id: str) -> str:
    """The id of the child that runs the leaders again on the validation range."""
    return f"{child_prefix(parent_id)}-v"


def chunk_range(parent_id: str, child_id: str) -> tuple[int, int] | None:
    """``(first, count)`` of a chunk child's id; None for another child (validation)."""
    prefix = child_prefix(parent_id) + "-"
    first, sep, count = child_id.removeprefix(prefix).partition("n")
    if not child_id.startswith(prefix) or not sep or not first.isdigit() or not count.isdigit():
        return None
    return int(first), int(count)


def chunk_size(count: int, slots: int, fixed: int | None) -> int:
    """Combinations per chunk: ``fixed``, or ``count`` spread over ``slots`` (not below
    :data:`MIN_CHUNK`), never over :data:`MAX_CHUNK`."""
    size = fixed or max(MIN_CHUNK, math.ceil(count / max(1, slots)))
    return min(size, MAX_CHUNK)


def spans(trials: Iterable[Trial], size: int) -> list[list[Trial]]:
    """``trials`` cut into runs of consecutive indexes of at most ``size`` (an id names
    a span, so a gap starts a new chunk)."""
    out: list[list[Trial]] = []
    run: list[Trial] = []
    for trial in trials:
        if run and (len(run) >= size or trial.index != run[-1].index + 1):
            out.append(run)
            run = []
        run.append(trial)
    if run:
        out.append(run)
    return out


async def free_slots(placement: Placement, hosts: list[Host], resources: Resources) -> int:
    """How many chunks of ``resources`` the hosts can run at once now (at least 1; all
    they could hold when none is free now)."""
    need_cpus, need_memory = need_of(resources)
    with contextlib.suppress(Exception):  # a stale view only changes how the grid is cut
        await placement.refresh_usage(hosts)
    free = total = 0
    for host in hosts:
        used = placement.usage(host.name)
        by_cpu = int((host.cpus - used.cpus) // need_cpus) if need_cpus else 1
        by_memory = int((host.memory_bytes - used.memory_bytes) // need_memory) if need_memory else by_cpu
        free += max(0, min(by_cpu, by_memory))
        total += int(host.cpus // need_cpus) if need_cpus else 1
    return max(1, free or total)


def chunk_job(
    parent: OpRecord,
    params: SweepParams,
    child_id: str,
    trials: list[Trial],
    settings: BacktestParams | None = None,
) -> Job:
    """The ``sweep_chunk`` job of a child: the sweep's settings (or ``settings``, for the
    validation range), its combinations, the parent's resources, labels and data."""
    base = msgspec.to_builtins(settings if settings is not None else params)
    assert isinstance(base, dict)
    fields: dict[str, Any] = {k: v for k, v in base.items() if k in CHUNK_SETTINGS}
    fields.update(
        combinations=[t.params for t in trials],
        first_index=trials[0].index,
        maximize=params.maximize,
    )
    return Job(
        job_id=child_id,
        kind=CHUNK_KIND,
        params=fields,
        resources=parent.resources,
        labels={**parent.labels, "sweep": parent.op_id},
        submitted_by=parent.submitted_by,
        data_dir=parent.data_dir,
        parent_id=parent.op_id,
    )
