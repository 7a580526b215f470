"""Taking over the ops of dispatchers that died, and reaping containers nobody owns.

A dispatcher is dead when its lease in KV ``ktrdr_dispatchers`` expired
(:mod:`dispatcher.liveness`): it was killed, frozen or cut off for longer than
``lease_s``. Every service dispatcher sweeps every ``lease_s / 2`` (only while its own
lease is steady, so an outage that expired everyone's lease does not start a stampede):

- an active op of a dead dispatcher is claimed by compare-and-set (the record must still
  name the dead owner and the same attempt) and then adopted — its container followed to
  the end, or concluded from its exit code if it already exited — or, when its host does
  not answer, its container vanished or it was never started, made ``lost`` and requeued
  (``failed`` once its attempts are used up);
- a queued op whose requeuer died before publishing its job message gets that message
  published (idempotently: same message id).

Reaping (when a dispatcher starts, and when a host that was down answers again): a
labelled container is removed when its op is finished or unknown, or when it belongs to
an attempt the op no longer runs. A container of the current attempt whose owner lives
is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgspec

from discovery.base import DiscoveryError, Host
from dispatcher.engine import DockerEngine
from dispatcher.errors import KtrdrError, OwnershipLost
from dispatcher.fleet import publish_hosts
from dispatcher.intake import stored_cancel
from dispatcher.liveness import live_dispatchers
from dispatcher.opstore import Owner
from dispatcher.outcome import OpRun
from dispatcher.supervisor import job_from_record
from runner import registry
from runner.errors import UnknownKind
from runner.protocol import (
    ACTIVE_STATES,
    LABEL_ATTEMPT,
    LABEL_CLUSTER,
    LABEL_DISPATCHER,
    LABEL_OP_ID,
    LABEL_POOL,
    OpRecord,
    container_name,
    now,
    op_of_container,
)

if TYPE_CHECKING:
    from dispatcher.service import Dispatcher

log = logging.getLogger("ktrdr.reconcile")


async def reconcile(d: Dispatcher) -> None:
    """On start: reap every reachable host, then take over what dead dispatchers left."""
    live = await live_dispatchers(d.leases_kv)
    for host in d.fleet.hosts():
        await reap_host(d, host.name, live)
    await take_over_orphans(d, live)


async def sweep(d: Dispatcher) -> None:
    """Take over dead dispatchers' ops, every ``lease_s / 2``, for the dispatcher's life."""
    interval_s = d.config.dispatcher.lease_s / 2
    while True:
        await asyncio.sleep(interval_s)
        if not d.lease.stable:
            continue  # we may be the one cut off: decide nothing about others now
        try:
            await take_over_orphans(d, await live_dispatchers(d.leases_kv))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatcher %s: sweep failed", d.dispatcher_id)


def _orphaned(d: Dispatcher, record: OpRecord, live: set[str]) -> bool:
    if record.dispatcher == d.dispatcher_id:  # ours from an earlier life of this id
        return record.op_id not in d.runs and record.op_id not in d.sweeps and record.op_id not in d.claiming
    return record.dispatcher not in live


async def take_over_orphans(d: Dispatcher, live: set[str]) -> None:
    """Claim and adopt (or requeue) every active op whose dispatcher is dead (and count
    the ops by state for the metrics, from the same read).

    The bucket keeps every finished op for the retention period: the records are read a
    batch at a time and only those that may need a hand (active, or requeued) are kept,
    so the dispatcher's memory does not grow with the ops it has run."""
    states: Counter[str] = Counter()
    records: list[OpRecord] = []
    async for batch in d.store.scan():
        states.update(record.state for record in batch)
        records += [r for r in batch if r.state in ACTIVE_STATES or (r.state == "queued" and r.attempts >= 1)]
    d.metrics.count_states(states)
    for record in records:
        if record.state in ACTIVE_STATES and _orphaned(d, record, live):
            try:
                await take_over(d, record)
            except OwnershipLost:
                pass  # someone else took it first
            except (KtrdrError, DiscoveryError) as exc:
                log.warning("op %s: take-over failed (%s); next sweep tries again", record.op_id, exc)
        elif (
            record.state == "queued"
            and record.attempts >= 1
            and _orphaned(d, record, live)
            and now() - record.timestamps.get("queued", 0.0) < d.config.nats.dedupe_window_s * 0.9
        ):
            # its requeuer may have died before publishing the job message: publish it
            # again with the same message id (a no-op when it was published)
            await d.supervisor.publish_requeued(record)


async def take_over(d: Dispatcher, record: OpRecord) -> None:
    """Claim one orphaned active op, then adopt its container or requeue it."""
    dead = record.dispatcher

    def claim(current: OpRecord) -> OpRecord | None:
        if (current.state, current.dispatcher, current.attempts) != (record.state, dead, record.attempts):
            return None
        return msgspec.structs.replace(current, dispatcher=d.dispatcher_id)

    claimed = await d.store.update(record.op_id, claim)
    if claimed is None:
        return
    owner = Owner(d.dispatcher_id, claimed.attempts)
    log.info(
        "op %s: taking over from %s (%s, attempt %d)", claimed.op_id, dead, claimed.state, claimed.attempts
    )
    if _coordinated(claimed.kind):
        # a sweep has no container: its coordinator starts again here and picks up the
        # children its dead dispatcher listed
        d.coordinate(claimed, owner)
        request = await stored_cancel(d.js, claimed)
        if request is not None:
            await d.request_cancel(claimed.op_id, request)
        return
    host = d.fleet.host(claimed.host)
    if claimed.state == "placing" or not claimed.container_id:
        # it may have created the container without recording it: that one goes too
        await remove_attempt_containers(d, claimed)
        await requeue_lost(d, claimed, owner, f"its dispatcher {dead} died before starting the container")
        return
    if host is None or not d.fleet.usable(host.name):
        await requeue_lost(
            d, claimed, owner, f"its dispatcher {dead} died and its host {claimed.host} does not answer"
        )
        return
    engine = await d.fleet.engine(host)
    try:
        attrs = await engine.call(engine.api.inspect_container, claimed.container_id)
    except KtrdrError as exc:
        if "No such container" not in str(exc) and "404" not in str(exc):
            raise
        await requeue_lost(d, claimed, owner, "its container vanished while no dispatcher watched it")
        return
    if (attrs.get("State") or {}).get("Status") == "created":  # created, never started
        await engine.remove(claimed.container_id)
        await requeue_lost(d, claimed, owner, f"its dispatcher {dead} died before starting the container")
        return
    await adopt(d, claimed, owner, host, engine)


async def adopt(d: Dispatcher, record: OpRecord, owner: Owner, host: Host, engine: DockerEngine) -> None:
    """Follow a running (or exited) container of an op this dispatcher now owns."""
    log.info("op %s: adopting container %s on %s", record.op_id, record.container_id[:12], host.name)
    run = OpRun(
        op_id=record.op_id,
        job=job_from_record(record),
        reservation=await d.placement.adopt(record.op_id, record.resources, host, record.attempts),
        engine=engine,
        owner=owner,
        attempt=record.attempts,
        attempt_base=record.attempts_before_requeue,
        container_id=record.container_id,
        started_ts=record.timestamps.get("starting", 0.0),
        running_ts=record.timestamps.get("running", 0.0),
        logs_since=now(),
        seen_runner=True,  # it ran under its old owner; from now on silence counts
    )
    with contextlib.suppress(Exception):
        run.runner_url = await d.supervisor.runner_url(host.name, engine)
    d.runs[run.op_id] = run

    async def follow() -> None:
        try:
            await d.supervisor.supervise(run, record, adopted=True)
        finally:
            if d.runs.get(run.op_id) is run:  # a next attempt may be running already
                del d.runs[run.op_id]

    d.spawn(follow())
    request = await stored_cancel(d.js, record)
    if request is not None:
        await d.request_cancel(record.op_id, request)


async def remove_attempt_containers(d: Dispatcher, record: OpRecord) -> None:
    """Remove the containers of the op's current attempt on its host (best effort: a host
    that does not answer is reaped when it answers again)."""
    host = d.fleet.host(record.host) if record.host else None
    if host is None or not d.fleet.usable(host.name):
        return
    try:
        engine = await d.fleet.engine(host)
        labels = [f"{LABEL_OP_ID}={record.op_id}", f"{LABEL_ATTEMPT}={record.attempts}"]
        found: list[dict[str, Any]] = await engine.call(
            engine.api.containers, all=True, filters={"label": labels}
        )
        # a warm pool container claimed for the op: known by its name, not its labels
        name = container_name(record.op_id, record.attempts)
        named: list[dict[str, Any]] = await engine.call(
            engine.api.containers, all=True, filters={"name": f"^/{name}$"}
        )
        for container in {c["Id"]: c for c in [*found, *named]}.values():
            log.info(
                "removing container %s of op %s (attempt %d)",
                container["Id"][:12],
                record.op_id,
                record.attempts,
            )
            await engine.remove(container["Id"])
    except (KtrdrError, DiscoveryError) as exc:
        log.warning(
            "op %s: could not remove its attempt's containers on %s (%s)", record.op_id, host.name, exc
        )


def _coordinated(kind: str) -> bool:
    try:
        return registry.get(kind).coordinated
    except UnknownKind:
        return False


async def requeue_lost(d: Dispatcher, record: OpRecord, owner: Owner, why: str) -> None:
    """Mark an op lost and requeue it, or fail it once its attempts are used up; what its
    dead dispatcher reserved for it is freed."""
    if record.host:
        await d.placement.drop(record.host, {record.op_id})
    if record.attempts - record.attempts_before_requeue >= d.config.dispatcher.max_attempts:
        await d.supervisor.fail(record.op_id, owner, "lost", f"lost: {why} (attempt {record.attempts})")
        return
    log.warning("op %s lost (%s); requeueing", record.op_id, why)
    await d.supervisor.requeue(record.op_id, why, owner=owner, delay_s=0.0, lost=True)


async def watch_hosts(d: Dispatcher) -> None:
    """Health-check hosts on an interval; a host that stopped answering loses its ops;
    a host that answers again has its leftover containers reaped."""
    interval_s = d.config.discovery.health_interval_s
    while True:
        try:
            await publish_hosts(d.fleet, d.placement, d.hosts_kv)
            await asyncio.sleep(interval_s)
            back = await d.fleet.refresh()
            for run in list(d.runs.values()):
                host = run.reservation.host.name
                if not d.fleet.usable(host):
                    run.abort("host_down", f"host {host} stopped answering health checks")
            for name in back:
                if not d.own_only:
                    d.spawn(reap_host(d, name))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatcher %s: host refresh failed", d.dispatcher_id)
            await asyncio.sleep(interval_s)


async def reap_host(d: Dispatcher, host_name: str, live: set[str] | None = None) -> None:
    """Remove the labelled containers on a host that no op attempt owns."""
    host = d.fleet.host(host_name)
    if host is None:
        return
    try:
        engine = await d.fleet.engine(host)
        containers: list[dict[str, Any]] = await engine.call(
            engine.api.containers,
            all=True,
            filters={"label": [LABEL_OP_ID, f"{LABEL_CLUSTER}={d.supervisor.deployment}"]},
        )
    except (KtrdrError, DiscoveryError) as exc:
        log.warning("reap: host %s unreachable (%s); skipped", host_name, exc)
        return
    if live is None:
        live = await live_dispatchers(d.leases_kv)
    for container in containers:
        why = await _stale(d, container, live)
        if why:
            labels = container.get("Labels") or {}
            log.info(
                "removing container %s of op %s on %s (%s)",
                container["Id"][:12],
                op_of_container((container.get("Names") or [""])[0], labels)[0] or "(warm, none)",
                host_name,
                why,
            )
            with contextlib.suppress(KtrdrError):
                await engine.remove(container["Id"])
    stale_reservations = set()
    for op_id in await d.placement.reserved_ops(host_name):
        holder = await d.store.find(op_id)
        if holder is None or holder.terminal or (_orphaned(d, holder, live) and holder.state == "queued"):
            stale_reservations.add(op_id)
    if stale_reservations:
        log.info("reap: dropping %d stale reservation(s) on %s", len(stale_reservations), host_name)
        await d.placement.drop(host_name, stale_reservations)


async def _stale(d: Dispatcher, container: dict[str, Any], live: set[str]) -> str:
    """Why a labelled container should go ("" when it belongs to a live attempt)."""
    labels = container.get("Labels") or {}
    name = (container.get("Names") or [""])[0]
    op_id, attempt = op_of_container(name, labels)
    cid = container["Id"]
    if not op_id and LABEL_POOL in labels:  # a warm container no op has taken
        owner = labels.get(LABEL_DISPATCHER, "")
        if container.get("State") in ("exited", "dead"):
            return "a warm container that ended without an op"
        if owner == d.dispatcher_id:  # this id's, but maybe of an earlier life of it
            return (
                "" if d.pool is not None and d.pool.holds(name) else "a warm container our pool does not hold"
            )
        return "" if owner in live else f"a warm container of {owner}, gone"
    record = await d.store.find(op_id)
    if record is None:
        return "no op record"
    if record.terminal:
        return f"op {record.state}"
    if record.container_id == cid:
        return ""  # the current attempt's: its owner (or a take-over) follows it
    same_attempt = attempt == str(record.attempts)
    owner_alive = labels.get(LABEL_DISPATCHER, "") == record.dispatcher and not _orphaned(d, record, live)
    if same_attempt and record.state in ("placing", "starting") and owner_alive:
        return ""  # being started right now
    return "an attempt the op no longer runs"
