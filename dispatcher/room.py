"""Waiting for room: a job message is held until its op's retry time has come, the
dispatcher runs fewer ops than it may, and a host has the op's resources free; then the
op holds a reservation there (and the warm container of its shape, if the pool has one)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from discovery.base import DiscoveryError
from dispatcher.config import Config
from dispatcher.engine import DockerEngine
from dispatcher.fleet import Fleet
from dispatcher.joblease import JobLease
from dispatcher.opstore import OpStore
from dispatcher.placement import Placement, Reservation
from dispatcher.pool import WarmPool
from dispatcher.warm import WarmContainer
from runner.protocol import OpRecord, Resources, now


@dataclass(frozen=True, slots=True)
class Placed:
    """Where an op will run: its reservation, the host's engine, its record as it was
    read, and the warm container taken for it (None: it gets a fresh one)."""

    reservation: Reservation
    engine: DockerEngine
    record: OpRecord
    warm: WarmContainer | None


class Room:
    """Finds room for the ops of one dispatcher, one held job message at a time."""

    def __init__(
        self,
        config: Config,
        store: OpStore,
        placement: Placement,
        fleet: Fleet,
        *,
        running: Callable[[], int],
        max_concurrent: int,
        stopping: asyncio.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.placement = placement
        self.fleet = fleet
        #: The warm pool to take containers from (set once the dispatcher has one).
        self.pool: WarmPool | None = None
        self._running = running
        self.max_concurrent = max_concurrent
        self._stopping = stopping
        self._slot_freed = asyncio.Event()
        self._no_room: set[str] = set()  # ops whose last try to reserve found no room

    def starved(self) -> bool:
        """Whether some op waits for room now (the warm pool does not grow then)."""
        return bool(self._no_room)

    def free_slot(self) -> None:
        """Wake what waits for room: an op ended, a message was let go, or we stop."""
        event, self._slot_freed = self._slot_freed, asyncio.Event()
        event.set()

    async def wait_for_slot(self, timeout_s: float) -> None:
        """Until :meth:`free_slot`, or ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_freed.wait(), timeout_s)

    def put_back(self, warm: WarmContainer | None) -> None:
        """A warm container taken for an op that will not run it after all."""
        if warm is not None and self.pool is not None:
            self.pool.put_back(warm)

    async def place(self, lease: JobLease, op_id: str, resources: Resources) -> Placed | None:
        """Hold the job message until the op's retry time has come and it fits somewhere;
        None when the message needs nothing more (claimed or cancelled meanwhile, or handed
        back because this dispatcher is stopping)."""
        try:
            return await self._place(lease, op_id, resources)
        finally:
            self._no_room.discard(op_id)

    async def _place(self, lease: JobLease, op_id: str, resources: Resources) -> Placed | None:
        renew_every_s = self.config.dispatcher.ack_wait_s / 3
        renewed = time.monotonic()
        while True:
            if self._stopping.is_set():
                with contextlib.suppress(Exception):  # a one-shot's message just stays queued
                    await lease.nak()  # let another dispatcher have it now
                return None
            current = await self.store.find(op_id)
            if current is None or current.state != "queued":
                await lease.ack()
                return None
            wait_s = current.retry_at - now()
            if wait_s <= 0 and self._running() < self.max_concurrent:
                reservation = await self.placement.reserve(
                    op_id, resources, self.fleet.hosts(), self.fleet.gpu_usable, attempt=current.attempts + 1
                )
                self._no_room.discard(op_id)
                if reservation is None:
                    self._no_room.add(op_id)
                else:
                    warm = None
                    if self.pool is not None:
                        # its warm container now, before the pool gives back room for it
                        warm = self.pool.take(reservation, resources, current.data_dir)
                        self.pool.wake()
                    try:
                        engine = await self.fleet.engine(reservation.host)
                        return Placed(reservation, engine, current, warm)
                    except DiscoveryError as exc:
                        self.fleet.mark_down(reservation.host.name, str(exc))
                        await self.placement.release(reservation)
                        self.put_back(warm)
            if time.monotonic() - renewed >= renew_every_s:
                with contextlib.suppress(Exception):
                    await lease.in_progress()
                renewed = time.monotonic()
            await self.wait_for_slot(min(1.0, wait_s) if wait_s > 0.05 else 1.0)
