"""The warm pool: a few started runner containers per host and shape, each for one op.

An op whose resources match a configured shape (``[[pool.shapes]]``: CPUs and memory,
with the default data mount, never GPUs) takes a warm container on the host it was
placed on instead of creating one; the taken container runs that op only and is removed
afterwards like any other, and the pool starts a replacement in the background.

Sizing: each (host, shape) keeps ``min`` warm containers; an op that finds none warm
raises the target by one, up to ``max``; containers idle for ``idle_ttl_s`` beyond
``min`` are removed and the target shrinks back. Capacity: ops are placed as if the pool
did not exist (their reservations never wait for it), and the pool fills only into what
reservations leave free and gives containers back, newest first, whenever reservations
grow into what it holds. So it never holds capacity a waiting op needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from discovery.base import DiscoveryError, Host
from dispatcher.config import Config, PoolShape
from dispatcher.engine import DockerEngine, hardened_host_config
from dispatcher.errors import ConfigError, KtrdrError
from dispatcher.fleet import Fleet
from dispatcher.placement import Placement, Reservation, Usage, max_ops_of
from dispatcher.warm import WarmContainer, warm_name
from runner import registry
from runner.errors import UnknownKind
from runner.protocol import Resources

log = logging.getLogger("ktrdr.pool")

ImageOn = Callable[[DockerEngine, bool], Awaitable[str]]
MAX_BACKOFF_S = 60.0
#: At most this many containers of one (host, shape) warming at once.
WARMING_PER_SLOT = 2


def shape_key(cpus: float, memory_gb: float) -> str:
    """The label value naming a shape, e.g. ``0.5cpu-1gb``."""
    return f"{cpus:g}cpu-{memory_gb:g}gb"


def _same(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


@dataclass
class _Slot:
    """The warm containers of one shape on one host."""

    shape: PoolShape
    target: int
    ready: list[WarmContainer] = field(default_factory=list)
    warming: int = 0
    failures: int = 0
    retry_at: float = 0.0
    image: str = ""

    @property
    def count(self) -> int:
        return len(self.ready) + self.warming


class WarmPool:
    """Warm runner containers per (host, shape), owned by one dispatcher."""

    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        placement: Placement,
        image_on: ImageOn,
        dispatcher_id: str,
        *,
        data_dir: str = "",
        starved: Callable[[], bool] = lambda: False,
    ) -> None:
        for index, shape in enumerate(config.pool.shapes):
            for kind in shape.kinds:
                try:
                    registry.get(kind)
                except UnknownKind as exc:
                    raise ConfigError(f"pool.shapes[{index}].kinds: {exc}") from None
        self.config = config
        #: Whether ops wait for room now: the pool does not grow then.
        self._starved = starved
        self.fleet = fleet
        self.placement = placement
        self._image_on = image_on
        self.dispatcher_id = dispatcher_id
        #: The default data mount every warm container gets (ops with another take none).
        self.data_dir = data_dir
        #: The deployment's id, labelled on containers (set by the dispatcher at start).
        self.deployment = ""
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._names: set[str] = set()  # of the warm containers held or being made

    @property
    def shapes(self) -> list[PoolShape]:
        """The configured shapes."""
        return list(self.config.pool.shapes)

    def wake(self) -> None:
        """Look at the pool again now (an op was placed, taken a container, or ended)."""
        self._wake.set()

    # -- what ops see ----------------------------------------------------------------------

    def take(self, reservation: Reservation, resources: Resources, data_dir: str) -> WarmContainer | None:
        """A warm container for this op on its reserved host, if one of its shape is ready;
        None otherwise (and the shape's target grows: the next op of it may find one)."""
        if reservation.gpu_ids or data_dir != self.data_dir:
            return None
        for shape in self.shapes:
            if _same(shape.cpus, resources.cpus or 0.0) and _same(
                shape.memory_gb, resources.memory_gb or 0.0
            ):
                break
        else:
            return None
        slot = self._slot(reservation.host.name, shape)
        self.wake()
        if not slot.ready:
            if slot.target < shape.max:
                slot.target += 1
                log.info(
                    "pool: no warm %s container on %s; keeping %d there now",
                    shape_key(shape.cpus, shape.memory_gb),
                    reservation.host.name,
                    slot.target,
                )
            return None
        # the newest: older ones age out when demand drops. It stays ours (the reaper
        # leaves it) until it is renamed for its op or removed
        return slot.ready.pop()

    async def claim(self, member: WarmContainer, name: str, op_id: str) -> WarmContainer | None:
        """Rename a taken container after the op it will run; None (and it goes) when the
        engine refuses: the op then gets a fresh container the usual way."""
        try:
            await member.claim(name)
        except KtrdrError as exc:
            log.info("op %s: warm container unusable (%s); starting a fresh one", op_id, exc)
            await self._discard(member)
            return None
        self._names.discard(member.name)  # the op's now: found by its new name
        return member

    def put_back(self, member: WarmContainer) -> None:
        """A taken container that was not used after all (its op went elsewhere): warm
        again, for the next op of its shape."""
        slot = self._slots.get((member.host, member.shape))
        if slot is None:
            self.discard(member)
            return
        self._names.add(member.name)
        slot.ready.append(member)
        self.wake()

    def discard(self, member: WarmContainer) -> None:
        """Remove a taken container that will not run its op (in the background)."""
        self._spawn(self._discard(member))

    def holds(self, container_name: str) -> bool:
        """Whether a warm container of that name is this pool's (held, or being made)."""
        return container_name.lstrip("/") in self._names

    def sizes(self) -> dict[tuple[str, str], int]:
        """Containers per (shape, state: warm | warming), over all hosts."""
        sizes: dict[tuple[str, str], int] = {}
        for (_host, key), slot in list(self._slots.items()):
            sizes[(key, "warm")] = sizes.get((key, "warm"), 0) + len(slot.ready)
            sizes[(key, "warming")] = sizes.get((key, "warming"), 0) + slot.warming
        return sizes

    # -- keeping it filled -------------------------------------------------------------------

    def _slot(self, host_name: str, shape: PoolShape) -> _Slot:
        key = (host_name, shape_key(shape.cpus, shape.memory_gb))
        if key not in self._slots:
            self._slots[key] = _Slot(shape=shape, target=shape.min)
        return self._slots[key]

    async def run(self) -> None:
        """Keep the pool sized until cancelled; then remove every container it holds."""
        tick_s = max(0.5, min(5.0, self.config.pool.idle_ttl_s / 2))
        try:
            while True:
                self._wake.clear()
                try:
                    await self._maintain()
                except Exception:  # keep the pool going; the next wake tries again
                    log.exception("pool: maintenance failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), tick_s)
        finally:
            await self._empty()

    async def _maintain(self) -> None:
        hosts = {h.name: h for h in self.fleet.hosts() if self.fleet.usable(h.name)}
        starved = self._starved()
        for (host_name, _key), slot in list(self._slots.items()):
            if host_name not in hosts:  # down or gone: its containers are not ours to wait on
                for member in slot.ready:
                    member.close_input()
                slot.ready.clear()
        for host in hosts.values():
            self._expire(host)
            self._trim(host)
            for shape in self.shapes:
                slot = self._slot(host.name, shape)
                while (
                    not starved
                    and slot.count < slot.target
                    and slot.warming < WARMING_PER_SLOT
                    and time.monotonic() >= slot.retry_at
                    and self._fits(host, shape)
                ):
                    slot.warming += 1
                    self._spawn(self._warm_one(host, slot))

    def _held(self, host_name: str) -> tuple[float, int, int]:
        """CPUs, memory bytes and containers the pool holds on a host."""
        cpus, memory, count = 0.0, 0, 0
        for (name, _key), slot in self._slots.items():
            if name == host_name:
                cpus += slot.shape.cpus * slot.count
                memory += int(slot.shape.memory_gb * 1024**3) * slot.count
                count += slot.count
        return cpus, memory, count

    def _over(self, host: Host, usage: Usage, extra_cpus: float = 0.0, extra_memory: int = 0) -> bool:
        cpus, memory, count = self._held(host.name)
        limit = max_ops_of(host)
        return (
            usage.cpus + cpus + extra_cpus > host.cpus + 1e-9
            or usage.memory_bytes + memory + extra_memory > host.memory_bytes
            or bool(limit and usage.ops + count + (1 if extra_cpus or extra_memory else 0) > limit)
        )

    def _fits(self, host: Host, shape: PoolShape) -> bool:
        usage = self.placement.usage(host.name)
        return not self._over(host, usage, shape.cpus, int(shape.memory_gb * 1024**3))

    def _trim(self, host: Host) -> None:
        """Give back warm containers, newest first, while reservations and the pool
        together claim more than the host has."""
        usage = self.placement.usage(host.name)
        while self._over(host, usage):
            slots = [s for (name, _k), s in self._slots.items() if name == host.name and s.ready]
            if not slots:
                return  # only warming ones left: they are trimmed once ready
            slot = max(slots, key=lambda s: len(s.ready))
            member = slot.ready.pop()
            slot.target = max(slot.shape.min, min(slot.target, slot.count))
            log.info(
                "pool: giving back warm container %s on %s (ops need the room)",
                member.container_id[:12],
                host.name,
            )
            self._spawn(self._discard(member))

    def _expire(self, host: Host) -> None:
        ttl_s = self.config.pool.idle_ttl_s
        now_s = time.monotonic()
        for (name, _key), slot in list(self._slots.items()):
            if name != host.name:
                continue
            while len(slot.ready) > slot.shape.min and now_s - slot.ready[0].ready_since > ttl_s:
                member = slot.ready.pop(0)
                slot.target = max(slot.shape.min, slot.target - 1)
                log.debug("pool: warm container %s idle for %gs; removed", member.container_id[:12], ttl_s)
                self._spawn(self._discard(member))

    async def _warm_one(self, host: Host, slot: _Slot) -> None:
        cfg = self.config.dispatcher
        member: WarmContainer | None = None
        name = ""
        key = shape_key(slot.shape.cpus, slot.shape.memory_gb)
        try:
            engine = await self.fleet.engine(host)
            slot.image = await self._image_on(engine, False)
            host_config = hardened_host_config(
                engine.api,
                Resources(cpus=slot.shape.cpus, memory_gb=slot.shape.memory_gb),
                pids_limit=cfg.pids_limit,
                scratch_mb=cfg.scratch_mb,
                data_dir=self.data_dir,
            )
            name = warm_name()
            self._names.add(name)
            starting = asyncio.ensure_future(
                WarmContainer.start(
                    engine,
                    host=host.name,
                    name=name,
                    image=slot.image,
                    shape=key,
                    host_config=host_config,
                    dispatcher_id=self.dispatcher_id,
                    deployment=self.deployment,
                    wait_s=self.config.pool.idle_ttl_s + 3600.0,
                    kinds=slot.shape.kinds,
                )
            )
            try:
                member = await asyncio.shield(starting)
            except asyncio.CancelledError:  # stopping: let the create finish, then remove it
                with contextlib.suppress(Exception):
                    await self._discard(await starting)
                raise
            await member.wait_ready(cfg.runner_ready_s)
        except asyncio.CancelledError:
            if member is not None:
                await self._discard(member)
            raise
        except (KtrdrError, DiscoveryError, OSError) as exc:
            self._names.discard(name)
            slot.failures += 1
            delay_s = min(MAX_BACKOFF_S, 2.0 ** (slot.failures - 1))
            slot.retry_at = time.monotonic() + delay_s
            if slot.failures == 1 or delay_s == MAX_BACKOFF_S:
                log.warning(
                    "pool: could not warm a %s container on %s (%s); retrying in %gs",
                    key,
                    host.name,
                    exc,
                    delay_s,
                )
            if member is not None:
                await self._discard(member)
            return
        finally:
            slot.warming -= 1
            self.wake()
        slot.failures = 0
        slot.ready.append(member)
        self._spawn(self._watch(slot, member))

    async def _watch(self, slot: _Slot, member: WarmContainer) -> None:
        """A warm container that exits while it waits is replaced (it never ran an op)."""
        with contextlib.suppress(KtrdrError):
            await member.engine.wait(member.container_id)
        if member in slot.ready:
            slot.ready.remove(member)
            log.warning(
                "pool: warm container %s on %s exited while waiting",
                member.container_id[:12],
                member.engine.name,
            )
            await self._discard(member)
            self.wake()

    async def _discard(self, member: WarmContainer) -> None:
        self._names.discard(member.name)
        member.close_input()
        with contextlib.suppress(KtrdrError):
            await member.engine.remove(member.container_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _empty(self) -> None:
        """Remove every container the pool holds (the dispatcher is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        members = [m for slot in self._slots.values() for m in slot.ready]
        for slot in self._slots.values():
            slot.ready.clear()
        removals = [self._discard(m) for m in members]
        await asyncio.gather(*removals, return_exceptions=True)
