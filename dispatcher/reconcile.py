"""Reconciliation when a dispatcher starts: make the engine and the op records agree.

- A container whose op is still active and whose dispatcher no longer answers is
  re-adopted (claimed by compare-and-set on the record) and followed to its end; one
  that exited meanwhile is concluded from its exit code and the event stream.
- A container whose op is terminal, unknown, or belongs to another attempt is removed.
- An active op whose dispatcher is gone and whose container vanished becomes ``lost``
  and is requeued while attempts remain (``failed`` otherwise).

Ops owned by a dispatcher that answers a ping are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from discovery.base import DiscoveryError, Host
from dispatcher.engine import DockerEngine
from dispatcher.errors import KtrdrError
from runner.protocol import (
    ACTIVE_STATES,
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    LABEL_DISPATCHER,
    LABEL_OP_ID,
    CancelRequest,
    DispatcherInfo,
    ErrorInfo,
    OpRecord,
    event_decoder,
    now,
    op_subject,
)

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

log = logging.getLogger("ktrdr.reconcile")


async def live_dispatchers(nc: Any, timeout_s: float = 0.5) -> set[str]:
    """Ids of the dispatchers that answer a ping within ``timeout_s``."""
    inbox = nc.new_inbox()
    answers: set[str] = set()

    async def collect(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            answers.add(msgspec.json.decode(msg.data, type=DispatcherInfo).dispatcher_id)

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(DISPATCHER_PING_SUBJECT, b"", reply=inbox)
    await asyncio.sleep(timeout_s)
    await sub.unsubscribe()
    return answers


async def reconcile(d: Dispatcher) -> None:
    """Adopt, reap and requeue on every host we can reach, as the module says."""
    live = await live_dispatchers(d.nc) - {d.dispatcher_id}
    adopted: set[str] = set()
    checked: set[str] = set()
    for host in d.fleet.hosts():
        try:
            engine = await d.fleet.engine(host)
            containers: list[dict[str, Any]] = await engine.call(
                engine.api.containers, all=True, filters={"label": LABEL_OP_ID}
            )
        except (KtrdrError, DiscoveryError) as exc:
            log.warning("reconcile: host %s unreachable (%s); skipped", host.name, exc)
            continue
        checked.add(host.name)
        for container in containers:
            if await _reconcile_container(d, host, engine, container, live):
                adopted.add(container["Labels"][LABEL_OP_ID])

    down = {h.name for h in d.fleet.all_hosts()} - checked
    for record in await d.store.list():
        if record.state not in ACTIVE_STATES or record.op_id in adopted or record.dispatcher in live:
            continue
        if record.host in checked:
            await requeue_lost(d, record, "its container vanished while no dispatcher watched it")
        elif record.host in down:
            await requeue_lost(d, record, f"its host {record.host} does not answer")

    for host_name in checked:  # reservations of ops nobody runs any more
        stale = set()
        for op_id in await d.placement.reserved_ops(host_name):
            holder = await d.store.find(op_id)
            if holder is None or holder.terminal or (holder.dispatcher not in live and op_id not in d.runs):
                stale.add(op_id)
        if stale:
            log.info("reconcile: dropping %d stale reservation(s) on %s", len(stale), host_name)
            await d.placement.drop(host_name, stale)


async def _reconcile_container(
    d: Dispatcher, host: Host, engine: DockerEngine, container: dict[str, Any], live: set[str]
) -> bool:
    """Reap or adopt one labelled container; True when its op is now ours."""
    from dispatcher.outcome import OpRun
    from dispatcher.service import job_from_record

    labels = container.get("Labels") or {}
    op_id, owner, cid = labels.get(LABEL_OP_ID, ""), labels.get(LABEL_DISPATCHER, ""), container["Id"]
    if owner in live:
        return False
    record = await d.store.find(op_id)
    if record is None or record.terminal or record.container_id != cid:
        why = "no op record" if record is None else (record.state if record.terminal else "another attempt")
        log.info("removing container %s of op %s on %s (%s)", cid[:12], op_id, host.name, why)
        await engine.remove(cid)
        return False

    def claim(current: OpRecord) -> OpRecord | None:
        if current.terminal or current.container_id != cid or current.dispatcher in live:
            return None
        return msgspec.structs.replace(current, dispatcher=d.dispatcher_id)

    claimed = await d.store.update(op_id, claim)
    if claimed is None:
        return False
    if container.get("State") == "created":  # created, never started: start over
        await engine.remove(cid)
        await requeue_lost(d, claimed, "its dispatcher died before starting the container")
        return True
    log.info("op %s: adopting container %s on %s (%s)", op_id, cid[:12], host.name, container.get("State"))
    run = OpRun(
        op_id=op_id,
        job=job_from_record(claimed),
        msg=None,
        reservation=await d.placement.adopt(op_id, claimed.resources, host),
        engine=engine,
        attempt=claimed.attempts,
        container_id=cid,
        started_ts=claimed.timestamps.get("starting", 0.0),
        running_ts=claimed.timestamps.get("running", 0.0),
        logs_since=now(),
    )
    d.runs[op_id] = run
    d.spawn(d._supervise(run, claimed, adopted=True))
    request = await _pending_cancel(d, claimed, run.started_ts)
    if request is not None:
        await d.request_cancel(op_id, request)
    return True


async def requeue_lost(d: Dispatcher, record: OpRecord, why: str) -> None:
    """Mark an op lost and requeue it, or fail it once its attempts are used up."""
    if record.attempts >= d.config.dispatcher.max_attempts:
        log.warning("op %s lost (%s) after %d attempts; failing it", record.op_id, why, record.attempts)
        await d.store.transition(
            record.op_id,
            "failed",
            allowed_from=ACTIVE_STATES,
            error=ErrorInfo(reason="lost", message=f"lost: {why} (attempt {record.attempts})"),
        )
        return
    log.warning("op %s lost (%s); requeueing", record.op_id, why)
    await d.requeue(record.op_id, why, allowed_from=ACTIVE_STATES, delay_s=0.0, msg=None, lost=True)


async def _pending_cancel(d: Dispatcher, record: OpRecord, started_ts: float) -> CancelRequest | None:
    """A cancel intent recorded, or published while no dispatcher listened."""
    if record.cancel is not None:
        return CancelRequest(
            op_id=record.op_id,
            ts=record.cancel.requested_at,
            reason=record.cancel.reason,
            requested_by=record.cancel.requested_by,
        )
    try:
        raw = await d.js.get_last_msg(EVENTS_STREAM, op_subject(record.op_id, "cancel"))
    except Exception:  # noqa: BLE001 - no cancel request for this op
        return None
    request = event_decoder.decode(raw.data or b"{}")
    if isinstance(request, CancelRequest) and request.ts >= started_ts - 1.0:
        return request
    return None
