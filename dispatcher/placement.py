"""Placement: which host an op goes to, and what is reserved where.

Reservations live in KV ``ktrdr_reservations`` (one key per host: a map op id →
reservation) and change only by compare-and-set, so several dispatchers never
overcommit a host. Work that does not fit now stays in JetStream (its job message is
nak'ed with a delay), never in dispatcher memory.

Ranking (:func:`rank_hosts`) is a pure function:

- ``gpu: required`` — only hosts with enough usable, unreserved GPUs;
- ``gpu: preferred`` — those GPU hosts first, then any host without a GPU (CPU fallback);
- ``gpu: never`` — hosts without GPUs first, GPU hosts last (kept for GPU work);
- within each group, least load first (reserved CPUs after placement / CPUs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from discovery.base import Host
from discovery.gpu import gpu_device_ids
from discovery.health import kv_key
from dispatcher.constraints import host_excluded, no_host_allows, usable_gpus
from dispatcher.opstore import TRANSIENT_ERRORS, retrying
from runner.protocol import HostReservation, HostReservations, Resources, now

log = logging.getLogger("ktrdr.placement")

_decoder = msgspec.json.Decoder(HostReservations)
GpuUsable = Callable[[Host], bool]


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one op holds on one host."""

    op_id: str
    host: Host
    cpus: float
    memory_bytes: int
    gpu_ids: tuple[str, ...] = ()
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """What is reserved on a host now."""

    cpus: float = 0.0
    memory_bytes: int = 0
    gpu_ids: frozenset[str] = frozenset()
    ops: int = 0


def usage_of(reservations: HostReservations) -> Usage:
    """Sum a host's reservations."""
    return Usage(
        cpus=sum(r.cpus for r in reservations.values()),
        memory_bytes=sum(r.memory_bytes for r in reservations.values()),
        gpu_ids=frozenset(g for r in reservations.values() for g in r.gpu_ids),
        ops=len(reservations),
    )


def need_of(resources: Resources) -> tuple[float, int]:
    """CPUs and memory bytes of resolved resources."""
    return float(resources.cpus or 0.0), int((resources.memory_gb or 0.0) * 1024**3)


def gpus_needed(resources: Resources) -> int:
    """GPUs an op takes when it is placed on a GPU host (0 for ``gpu: never``)."""
    return 0 if resources.gpu == "never" else max(1, resources.gpus or 0)


def max_ops_of(host: Host) -> int:
    """The most ops a host may run at once (its ``max_ops`` label; 0 = no limit)."""
    try:
        return int(host.labels.get("max_ops", "0") or 0)
    except ValueError:
        return 0


def rank_hosts(
    hosts: Iterable[Host],
    usage: Callable[[str], Usage],
    resources: Resources,
    gpu_usable: GpuUsable,
) -> list[tuple[Host, tuple[str, ...]]]:
    """Hosts the op fits on now, best first, each with the GPU ids it would take."""
    need_cpus, need_memory = need_of(resources)
    gpu_first: list[tuple[float, Host, tuple[str, ...]]] = []
    plain: list[tuple[float, Host, tuple[str, ...]]] = []
    gpu_last: list[tuple[float, Host, tuple[str, ...]]] = []
    for host in hosts:
        if host_excluded(host, resources):
            continue
        used = usage(host.name)
        limit = max_ops_of(host)
        if limit and used.ops >= limit:
            continue
        if used.cpus + need_cpus > host.cpus + 1e-9 or used.memory_bytes + need_memory > host.memory_bytes:
            continue
        load = (used.cpus + need_cpus) / host.cpus if host.cpus else 1.0
        gpus = usable_gpus(host, resources)
        has_gpus = bool(gpus) and gpu_usable(host)
        free = [g for g in gpu_device_ids(gpus) if g not in used.gpu_ids] if has_gpus else []
        wanted = gpus_needed(resources)
        if resources.gpu in ("required", "preferred") and has_gpus and len(free) >= wanted:
            gpu_first.append((load, host, tuple(free[:wanted])))
        elif resources.gpu == "preferred" and not host.gpus:
            plain.append((load, host, ()))
        elif resources.gpu == "never":
            (gpu_last if host.gpus else plain).append((load, host, ()))
    groups = [gpu_first, plain, gpu_last]
    return [(host, gpus) for group in groups for _load, host, gpus in sorted(group, key=lambda x: x[0])]


@dataclass(frozen=True, slots=True)
class Capacity:
    """One resource of one host: what it has and what reservations leave free."""

    host: str
    resource: str  # cpus | memory_bytes | gpus
    total: float
    free: float


def capacity_of(hosts: Iterable[Host], usage: Callable[[str], Usage]) -> list[Capacity]:
    """Each host's CPUs, memory and GPUs: what it has, and what reservations leave free."""
    found = []
    for host in hosts:
        used = usage(host.name)
        gpus, memory = len(gpu_device_ids(host.gpus)), host.memory_bytes
        found += [
            Capacity(host.name, "cpus", host.cpus, max(0.0, host.cpus - used.cpus)),
            Capacity(host.name, "memory_bytes", memory, max(0, memory - used.memory_bytes)),
            Capacity(host.name, "gpus", gpus, max(0, gpus - len(used.gpu_ids))),
        ]
    return found


def why_never_placeable(hosts: list[Host], resources: Resources, gpu_usable: GpuUsable) -> str:
    """Why no host could ever run this op, even idle ("" when some host could)."""
    need_cpus, need_memory = need_of(resources)
    if not hosts:
        return "no hosts are available"
    excluded = no_host_allows(hosts, resources)
    if excluded:
        return excluded
    hosts = [h for h in hosts if not host_excluded(h, resources)]
    big_enough = [h for h in hosts if h.cpus >= need_cpus and h.memory_bytes >= need_memory]
    if not big_enough:
        big = max(hosts, key=lambda h: (h.cpus, h.memory_bytes))
        return (
            f"no host can fit cpus={need_cpus:g} memory_gb={need_memory / 1024**3:g} "
            f"(largest: {big.name}: {big.cpus:g} cpus, {big.memory_bytes / 1024**3:.1f} GiB)"
        )
    if resources.gpu == "required":
        wanted = gpus_needed(resources)
        gpu_hosts = [h for h in big_enough if usable_gpus(h, resources) and gpu_usable(h)]
        if not gpu_hosts:
            return "gpu: required, but no GPU capacity exists (no available host has a usable GPU)"
        if not any(len(usable_gpus(h, resources)) >= wanted for h in gpu_hosts):
            most = max(len(usable_gpus(h, resources)) for h in gpu_hosts)
            return f"gpu: required with gpus={wanted}, but no host has more than {most} GPU(s)"
    return ""


class Placement:
    """Reservations in KV, changed by compare-and-set."""

    def __init__(self, kv: KeyValue, dispatcher_id: str) -> None:
        self.kv = kv
        self.dispatcher_id = dispatcher_id
        self._cache: dict[str, Usage] = {}

    async def _read(self, host_name: str) -> tuple[HostReservations, int]:
        try:
            entry = await retrying(
                lambda: self.kv.get(kv_key(host_name)), what=f"read reservations of {host_name}"
            )
        except KeyNotFoundError:
            return {}, 0
        if not entry.value:
            return {}, int(entry.revision or 0)
        return _decoder.decode(entry.value), int(entry.revision or 0)

    async def _write(self, host_name: str, reservations: HostReservations, revision: int) -> bool:
        """One compare-and-set write; False on a conflict. A write whose reply was lost is
        recognised by reading back our own bytes."""
        data = msgspec.json.encode(reservations)
        key = kv_key(host_name)
        while True:
            try:
                if revision:
                    await self.kv.update(key, data, last=revision)
                else:
                    await self.kv.create(key, data)
                break
            except KeyWrongLastSequenceError:
                return False
            except TRANSIENT_ERRORS:
                await asyncio.sleep(0.2)
            try:
                entry = await retrying(lambda: self.kv.get(key), what=f"read reservations of {host_name}")
            except KeyNotFoundError:
                continue  # nothing was written: try again
            if entry.value == data and int(entry.revision or 0) > revision:
                break  # applied; only the reply was lost
            if int(entry.revision or 0) != revision:
                return False
        self._cache[host_name] = usage_of(reservations)
        return True

    async def refresh_usage(self, hosts: Iterable[Host]) -> None:
        """Read what is reserved on each host (before ranking)."""
        for host in hosts:
            reservations, _ = await self._read(host.name)
            self._cache[host.name] = usage_of(reservations)

    def usage(self, host_name: str) -> Usage:
        """What was reserved on a host at the last read or write."""
        return self._cache.get(host_name, Usage())

    async def reserve(
        self, op_id: str, resources: Resources, hosts: list[Host], gpu_usable: GpuUsable, attempt: int = 0
    ) -> Reservation | None:
        """Reserve room for attempt ``attempt`` of the op on the best host it fits on now,
        or None."""
        await self.refresh_usage(hosts)
        for host, _gpu_ids in rank_hosts(hosts, self.usage, resources, gpu_usable):
            for _ in range(8):  # compare-and-set: re-read and re-check on conflict
                reservations, revision = await self._read(host.name)
                self._cache[host.name] = usage_of(reservations)
                fits = rank_hosts([host], self.usage, resources, gpu_usable)
                if not fits:
                    break
                reservations[op_id] = self._entry(resources, fits[0][1], attempt)
                if await self._write(host.name, reservations, revision):
                    return Reservation(op_id, host, *need_of(resources), fits[0][1], attempt)
        return None

    def _entry(self, resources: Resources, gpu_ids: tuple[str, ...], attempt: int) -> HostReservation:
        need_cpus, need_memory = need_of(resources)
        return HostReservation(
            cpus=need_cpus,
            memory_bytes=need_memory,
            gpu_ids=list(gpu_ids),
            dispatcher=self.dispatcher_id,
            ts=now(),
            attempt=attempt,
        )

    async def adopt(
        self, op_id: str, resources: Resources, host: Host, attempt: int, gpu_ids: tuple[str, ...] = ()
    ) -> Reservation:
        """Hold what an already running op holds (taken over from a dead dispatcher), fit
        or not: its entry now names this dispatcher."""
        while True:
            reservations, revision = await self._read(host.name)
            held = reservations.get(op_id)
            if held is not None:
                gpu_ids = tuple(held.gpu_ids)
            reservations[op_id] = self._entry(resources, gpu_ids, attempt)
            if await self._write(host.name, reservations, revision):
                break
        return Reservation(op_id, host, *need_of(resources), gpu_ids, attempt)

    async def release(self, reservation: Reservation) -> None:
        """Free what the op held, unless another dispatcher or attempt holds it now."""
        while True:
            reservations, revision = await self._read(reservation.host.name)
            held = reservations.get(reservation.op_id)
            if held is None or held.dispatcher != self.dispatcher_id or held.attempt != reservation.attempt:
                return
            del reservations[reservation.op_id]
            if await self._write(reservation.host.name, reservations, revision):
                return

    async def drop(self, host_name: str, op_ids: set[str]) -> None:
        """Remove these ops' reservations from a host."""
        while True:
            reservations, revision = await self._read(host_name)
            if not op_ids & reservations.keys():
                return
            for op_id in op_ids:
                reservations.pop(op_id, None)
            if await self._write(host_name, reservations, revision):
                return

    async def reserved_ops(self, host_name: str) -> set[str]:
        """Ops holding a reservation on a host."""
        reservations, _ = await self._read(host_name)
        return set(reservations)
