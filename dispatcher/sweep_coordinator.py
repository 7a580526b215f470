"""The coordinator of one sweep: child ops in chunks, round by round, then the ranking.

The dispatcher that takes a ``sweep`` job runs its coordinator in-process (a sweep holds
no capacity and has no container). The coordinator:

- asks its trial source (:mod:`dispatcher.sweep_trials`) for a round of combinations;
- splits what no child covers yet into chunks sized to the free capacity and, for each,
  first lists the child in the parent's record, then publishes a ``sweep_chunk`` job
  (the child id is the message id, so publishing twice is harmless). Children are
  ordinary ops: any dispatcher runs them, with the usual retries and cancel;
- waits for the round's children (status events, with a slow poll behind them), adds
  their results to the :class:`~dispatcher.sweep_results.Tally`, publishes one ``trial``
  event per combination on the parent and its progress;
- after the last round, runs the top ``top_k`` again on the validation range (one more
  child), stores the ``results`` Parquet artifact and completes the parent.

A child id names its chunk (``<parent>-<first>n<count>``), so a coordinator started again
for the same parent — its dispatcher restarted, or another took the sweep over — reads
the children it listed, keeps the results of those that finished, waits for those still
running, and only submits what no child covers. Cancel stops asking, cancels every child
and ends the parent ``cancelled`` with what finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore

from discovery.base import Host
from dispatcher.errors import OwnershipLost
from dispatcher.opstore import OpStore, Owner, retrying
from dispatcher.placement import Placement
from dispatcher.sweep_children import (
    SHARED_RESULT_FIELDS,
    chunk_id,
    chunk_job,
    chunk_range,
    chunk_size,
    free_slots,
    spans,
    validation_id,
)
from dispatcher.sweep_results import Tally, describe
from dispatcher.sweep_trials import GridSource, Trial, TrialSource, trial_source
from runner import registry
from runner.ops.backtest import PARQUET, BacktestParams
from runner.ops.sweep import SweepParams, objective_of, validation_params
from runner.protocol import (
    TERMINAL_STATES,
    CancelIntent,
    CancelRequest,
    ErrorInfo,
    Job,
    OpRecord,
    ProgressEvent,
    ProgressSnapshot,
    ResultEvent,
    StatusEvent,
    TrialEvent,
    encode,
    event_decoder,
    now,
    op_events_filter,
    op_subject,
)
from runner.sdk import artifact_name
from runner.sweep.space import grid_values

log = logging.getLogger("ktrdr.sweep")

#: Seconds between the parent's progress reports.
PROGRESS_EVERY_S = 0.5
#: Seconds between polls of the children's records (status events wake the coordinator
#: sooner; the poll covers events missed while NATS was away).
POLL_S = 2.0
#: Seconds the coordinator waits for cancelled children to end before it gives up on them.
CANCEL_WAIT_S = 60.0


@dataclass
class CoordinatorDeps:
    """What a coordinator uses of its dispatcher."""

    nc: NATS
    js: JetStreamContext
    store: OpStore
    artifacts: ObjectStore
    placement: Placement
    hosts: Callable[[], list[Host]]
    #: Submits a child op's job (to the queue, or straight to a one-shot dispatcher).
    submit: Callable[[Job], Awaitable[None]]


@dataclass
class _Child:
    op_id: str
    trials: list[Trial]
    state: str = "queued"
    done_in_flight: int = 0
    collected: bool = False
    published: bool = False
    #: The chunk's result, from its ``result`` event (before its container has exited).
    result: dict[str, Any] | None = None
    #: A status event came since its record was last read.
    dirty: bool = True


class _Detached(Exception):  # control flow: the coordinator lets go of its sweep
    pass


class SweepCoordinator:
    """Runs one sweep (a parent op in ``running``, owned by ``owner``) to its end."""

    def __init__(self, deps: CoordinatorDeps, record: OpRecord, owner: Owner) -> None:
        self.deps = deps
        self.record = record
        self.op_id = record.op_id
        self.owner = owner
        op = registry.get(record.kind)
        parsed = op.parse_params(record.params, strict=False)
        assert isinstance(parsed, SweepParams)
        self.params = parsed
        self.objective = objective_of(parsed)
        self.children: dict[str, _Child] = {}
        self._listed = list(record.children)
        self._wake = asyncio.Event()
        self._cancel: CancelIntent | None = None
        self._deadline = (
            (record.timestamps.get("queued", now()) + record.timeout_s) if record.timeout_s else None
        )
        self._reported = 0.0
        #: What every chunk shares (bars, period, settings), from the first completed one.
        self._shared: dict[str, Any] = {}
        self._warnings: list[str] = []
        self._detached = False

    # -- control ------------------------------------------------------------------------

    def cancel(self, intent: CancelIntent) -> None:
        """Stop asking for combinations, cancel every child, end ``cancelled``."""
        if self._cancel is None:
            self._cancel = intent
            self._wake.set()

    def detach(self) -> None:
        """Let go of the sweep (its dispatcher is stopping): it stays ``running``, its
        children go on, and the dispatcher that takes it over resumes it."""
        self._detached = True
        self._wake.set()

    def _check_detached(self) -> None:
        if self._detached:
            raise _Detached

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the sweep to a terminal state (or stop quietly when another owner took it)."""
        try:
            await self._run()
        except OwnershipLost:
            log.info("sweep %s: taken over by another dispatcher; this coordinator stops", self.op_id)
        except _Detached:
            log.info("sweep %s: its dispatcher is stopping; left for the next one to resume", self.op_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("sweep %s: coordinator failed", self.op_id)
            with contextlib.suppress(Exception):
                await self._cancel_children("its sweep failed")
                await self.deps.store.transition(
                    self.op_id,
                    "failed",
                    allowed_from={"running"},
                    owner=self.owner,
                    error=ErrorInfo(reason="coordinator_error", message=f"{type(exc).__name__}: {exc}"),
                )

    async def _run(self) -> None:
        source = await asyncio.to_thread(trial_source, self.params, self.objective)
        tally = Tally(self.objective, list(self.params.space), source.planned)
        if self._listed:
            log.info("sweep %s: resuming with %d child op(s) listed", self.op_id, len(self._listed))
        while not self._stopping():
            trials = await asyncio.to_thread(source.next_round, tally.metrics_by_index())
            if trials is None:
                break
            tally.planned = source.planned  # a random space may run out of acceptable trials
            await self._run_round(trials, tally)
        validation: dict[int, Any] | None = None
        if not self._stopping() and self.params.validate_start is not None:
            validation = await self._validate(tally)
        await self._finish(source, tally, validation)

    def _stopping(self) -> bool:
        return self._cancel is not None or (self._deadline is not None and now() >= self._deadline)

    # -- one round ----------------------------------------------------------------------

    async def _run_round(self, trials: list[Trial], tally: Tally) -> None:
        by_index = {t.index: t for t in trials}
        covered: set[int] = set()
        round_children: list[_Child] = []
        for child_id in self._listed:
            span = chunk_range(self.op_id, child_id)
            if span is None or span[0] not in by_index:
                continue
            first, count = span
            child = self.children.get(child_id) or _Child(
                child_id, [by_index[i] for i in range(first, first + count)]
            )
            self.children[child_id] = child
            covered.update(range(first, first + count))
            round_children.append(child)
        missing = [t for t in trials if t.index not in covered and t.index not in tally.entries]
        if missing:  # a resumed round may have every combination covered already
            slots = await free_slots(self.deps.placement, self.deps.hosts(), self.record.resources)
            new = self._chunks(missing, slots)
            await self._list_children([c.op_id for c in new])
            round_children.extend(new)
        for child in round_children:
            existing = await self.deps.store.find(child.op_id)
            if existing is None:
                await self._publish_child(child)
            else:
                child.state = existing.state
                if existing.terminal:
                    await self._collect(child, existing, tally)
        await self._await_children(round_children, tally)

    def _chunks(self, trials: list[Trial], slots: int) -> list[_Child]:
        size = chunk_size(len(trials), slots, self.params.chunk_size)
        children = [_Child(chunk_id(self.op_id, run[0].index, len(run)), run) for run in spans(trials, size)]
        self.children.update((c.op_id, c) for c in children)
        return children

    async def _list_children(self, child_ids: list[str]) -> None:
        """Name new children in the parent's record before their jobs exist, so a
        coordinator started again finds every child that may run."""

        def mutate(record: OpRecord) -> OpRecord | None:
            listed = [c for c in child_ids if c not in record.children]
            return msgspec.structs.replace(record, children=[*record.children, *listed]) if listed else None

        await self.deps.store.update(self.op_id, mutate, owner=self.owner)
        self._listed.extend(c for c in child_ids if c not in self._listed)

    async def _publish_child(self, child: _Child, settings: BacktestParams | None = None) -> None:
        await self.deps.submit(chunk_job(self.record, self.params, child.op_id, child.trials, settings))
        child.published = True
        log.info("sweep %s: child %s submitted (%d combinations)", self.op_id, child.op_id, len(child.trials))

    # -- waiting for children ------------------------------------------------------------

    async def _await_children(self, children: list[_Child], tally: Tally) -> None:
        subs = [
            await self.deps.nc.subscribe(op_events_filter(c.op_id), cb=self._on_child_event)
            for c in children
            if not c.collected
        ]
        cancel_sent = False
        waited_since: float | None = None
        polled = time.monotonic()
        try:
            while True:
                self._check_detached()
                # cleared before reading: a status event from here on wakes the wait below
                self._wake.clear()
                pending = [c for c in children if not c.collected]
                if not pending:
                    return
                if self._stopping() and not cancel_sent:
                    reason = "its sweep was cancelled" if self._cancel else "its sweep timed out"
                    await self._cancel_children(reason, pending)
                    cancel_sent = True
                    waited_since = time.monotonic()
                if waited_since is not None and time.monotonic() - waited_since > CANCEL_WAIT_S:
                    log.warning("sweep %s: %d child op(s) did not end after cancel", self.op_id, len(pending))
                    return
                # records are read when a status event says they changed, and all of them
                # every POLL_S (events missed while NATS was away)
                poll = time.monotonic() - polled >= POLL_S
                if poll:
                    polled = time.monotonic()
                for child in pending:
                    if child.result is not None:
                        # the results are in: the container's exit is the child's business
                        await self._take(child, "completed", child.result, "", tally)
                        continue
                    if not (poll or child.dirty):
                        continue
                    child.dirty = False
                    record = await self.deps.store.find(child.op_id)
                    if record is None:
                        if not child.published:
                            await self._publish_child(child)
                        continue
                    child.state = record.state
                    if record.terminal:
                        await self._collect(child, record, tally)
                await self._report(tally)
                if all(c.collected for c in children):
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(POLL_S, PROGRESS_EVERY_S * 2))
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _on_child_event(self, msg: Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        child = self.children.get(event.op_id)
        if child is None:
            return
        if isinstance(event, ProgressEvent) and "done" in event.metrics:
            child.done_in_flight = int(event.metrics["done"])
        elif isinstance(event, ResultEvent) and isinstance(event.result.get("results"), list):
            # any attempt's result will do: a chunk's results follow from its params alone
            child.result = event.result
            self._wake.set()
        elif isinstance(event, StatusEvent):
            child.dirty = True
            self._wake.set()

    async def _collect(self, child: _Child, record: OpRecord, tally: Tally) -> None:
        """Add a finished child's combinations to the tally and announce each one."""
        why = record.error.message if record.error else f"chunk {record.state}"
        await self._take(child, record.state, record.result, why, tally)

    async def _take(
        self, child: _Child, state: str, result: dict[str, Any] | None, why: str, tally: Tally
    ) -> None:
        if child.collected:
            return
        child.collected = True
        entries: list[dict[str, Any]]
        results = (result or {}).get("results") if state == "completed" else None
        if isinstance(results, list):
            self._remember_shared(result or {})
            entries = [{**e, "child": child.op_id} for e in results if isinstance(e, dict) and "index" in e]
        else:
            if state == "cancelled" and self._cancel is not None:
                return  # cancelled with its sweep: its combinations did not run
            error = f"chunk {child.op_id} {state}: {why}"
            entries = [
                {"index": t.index, "params": t.params, "metrics": None, "error": error, "child": child.op_id}
                for t in child.trials
            ]
        new = tally.add(entries)
        log.info("sweep %s: child %s %s (%d combinations)", self.op_id, child.op_id, state, len(new))
        await self._announce(new)

    def _remember_shared(self, result: dict[str, Any]) -> None:
        if not self._shared:
            self._shared = {k: result[k] for k in SHARED_RESULT_FIELDS if k in result}
        for warning in result.get("warnings") or []:
            if warning not in self._warnings:
                self._warnings.append(warning)

    async def _announce(self, entries: list[dict[str, Any]]) -> None:
        """One ``trial`` event per combination on the parent's subject."""
        subject = op_subject(self.op_id, "trial")
        for entry in entries:
            event = TrialEvent(
                op_id=self.op_id,
                ts=now(),
                attempt=self.owner.attempt,
                index=int(entry["index"]),
                params=entry["params"],
                metrics=entry.get("metrics"),
                error=entry.get("error"),
                child=entry.get("child", ""),
            )
            await self.deps.nc.publish(subject, encode(event))
        with contextlib.suppress(Exception):
            await self.deps.nc.flush(timeout=5)

    async def _report(self, tally: Tally, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._reported < PROGRESS_EVERY_S:
            return
        self._reported = time.monotonic()
        in_flight = sum(c.done_in_flight for c in self.children.values() if not c.collected)
        done_children = sum(1 for c in self.children.values() if c.collected)
        percent, message, numbers = tally.progress(in_flight, (done_children, len(self.children)))
        snapshot = ProgressSnapshot(
            percent=percent, step="combinations", message=message, metrics=numbers, ts=now()
        )
        event = ProgressEvent(
            op_id=self.op_id,
            ts=snapshot.ts,
            attempt=self.owner.attempt,
            percent=percent,
            step=snapshot.step,
            message=message,
            metrics=numbers,
        )
        await self.deps.nc.publish(op_subject(self.op_id, "progress"), encode(event))

        def mutate(record: OpRecord) -> OpRecord | None:
            return None if record.terminal else msgspec.structs.replace(record, progress=snapshot)

        await self.deps.store.update(self.op_id, mutate, owner=self.owner)

    async def _cancel_children(self, reason: str, children: list[_Child] | None = None) -> None:
        for child in children if children is not None else list(self.children.values()):
            if child.collected or child.state in TERMINAL_STATES:
                continue
            request = CancelRequest(op_id=child.op_id, ts=now(), reason=reason, requested_by=self.op_id)
            await retrying(
                lambda c=child, r=request: self.deps.js.publish(op_subject(c.op_id, "cancel"), encode(r)),  # type: ignore[misc]
                what=f"cancel child {child.op_id}",
            )

    # -- validation and the end ----------------------------------------------------------

    async def _validate(self, tally: Tally) -> dict[int, Any]:
        """Run the ``top_k`` best again on the validation range; metrics by trial index."""
        board = tally.leaderboard(self.params.top_k)
        if not board:
            return {}
        trials = [Trial(row["index"], row["params"]) for row in board]
        child = _Child(validation_id(self.op_id), trials)
        self.children[child.op_id] = child
        if child.op_id not in self._listed:
            await self._list_children([child.op_id])
        settings = validation_params(self.params)
        found = await self.deps.store.find(child.op_id)
        if found is None:
            await self._publish_child(child, settings)
        record = await self._wait_one(child)
        if record is None or record.state != "completed":
            why = record.error.message if record is not None and record.error else "it did not complete"
            self._warnings.append(
                f"validation chunk {child.op_id} {record.state if record else 'ended'}: {why}"
            )
            return {}
        # a chunk numbers its results from first_index: the validation chunk's are in order
        results = (record.result or {}).get("results") or []
        return {t.index: e.get("metrics") for t, e in zip(trials, results, strict=False)}

    async def _wait_one(self, child: _Child) -> OpRecord | None:
        sub = await self.deps.nc.subscribe(op_events_filter(child.op_id), cb=self._on_child_event)
        try:
            cancel_sent = False
            while True:
                self._check_detached()
                self._wake.clear()
                record = await self.deps.store.find(child.op_id)
                if record is not None and record.terminal:
                    child.collected = True
                    return record
                if self._stopping() and not cancel_sent:
                    await self._cancel_children("its sweep was cancelled", [child])
                    cancel_sent = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _finish(self, source: TrialSource, tally: Tally, validation: dict[int, Any] | None) -> None:
        from runner.sweep.objective import metric_names

        await self._report(tally, force=True)
        artifacts: dict[str, str] = {}
        if tally.entries:
            data = await asyncio.to_thread(tally.parquet, metric_names())
            name = artifact_name(data)
            await retrying(
                lambda: self.deps.artifacts.put(name, data, meta=ObjectMeta(name=name, description=PARQUET)),
                what=f"store results of sweep {self.op_id}",
            )
            artifacts["results"] = name
        result = self._result(source, tally, validation)
        if self._stopping():
            await self._settle_children()
        if self._cancel is not None:
            state, message = "cancelled", f"cancelled after {len(tally.entries)} combinations"
            extra: dict[str, Any] = {"cancel": self._cancel}
        elif self._deadline is not None and now() >= self._deadline:
            state, message = "timed_out", f"timed out after {len(tally.entries)} combinations"
            extra = {
                "error": ErrorInfo(
                    reason="timeout", message=f"the sweep ran past its timeout of {self.record.timeout_s:g} s"
                )
            }
        else:
            state, message = "completed", _summary(result)
            extra = {}
        await self.deps.store.transition(
            self.op_id,
            state,
            allowed_from={"running"},
            owner=self.owner,
            message=message,
            result=result,
            artifacts=artifacts,
            **extra,
        )
        log.info("sweep %s %s: %s", self.op_id, state, message)

    async def _settle_children(self) -> None:
        """Wait (bounded) until every child has ended: a stopped sweep ends after its
        children, so what it reports of them holds. A completed sweep does not wait: its
        chunks' results are in, their containers exit on their own."""
        deadline = time.monotonic() + CANCEL_WAIT_S
        pending = list(self.children)
        while pending and time.monotonic() < deadline:
            self._check_detached()
            ended = []
            for child_id in pending:
                record = await self.deps.store.find(child_id)
                if record is None or record.terminal:
                    ended.append(child_id)
            pending = [c for c in pending if c not in ended]
            if pending:
                await asyncio.sleep(0.2)
        if pending:
            log.warning("sweep %s: %d child op(s) had not ended when it stopped", self.op_id, len(pending))

    def _result(self, source: TrialSource, tally: Tally, validation: dict[int, Any] | None) -> dict[str, Any]:
        params = self.params
        board = tally.leaderboard(params.top_k, validation)
        counts = tally.counts()
        elapsed = time.monotonic() - tally.started
        axes = (
            {name: grid_values(name, dim) for name, dim in params.space.items()}
            if isinstance(source, GridSource) and len(params.space) == 2
            else {}
        )
        return {
            "method": params.method,
            "maximize": self.objective.text,
            "param_names": list(params.space),
            "total": max(source.planned, counts["done"]),
            **counts,
            "excluded": source.excluded,
            "invalid": source.invalid,
            "leaderboard": board,
            "best": board[0] if board else None,
            "best_curve": tally.best_curve(),
            "surface": tally.surface(axes) if axes else None,
            "children": len(self.children),
            "elapsed_s": round(elapsed, 3),
            "combos_per_s": round(counts["done"] / elapsed, 3) if elapsed > 0 else 0.0,
            "validation": (
                {"start": params.validate_start, "end": params.validate_end}
                if params.validate_start
                else None
            ),
            "random_state": params.random_state,
            **self._shared,
            "warnings": self._warnings,
        }


def _summary(result: dict[str, Any]) -> str:
    best = result.get("best")
    text = f"{result['done']} combinations"
    if best:
        text += f", best {result['maximize']}={best['value']:.6g} ({describe(best['params'])})"
    return text
