"""The hosts a dispatcher can place ops on, with one :class:`DockerEngine` each.

Hosts come from the discovery inventory (Docker engines, Proxmox LXC workers, static
GPU hosts), refreshed and health-checked on an interval, or from a fixed list (one
local engine: tests, benchmarks, the one-shot CLI without a ``[discovery]`` section).
Every engine is health-checked with a deadline (fixed hosts here, discovered ones by the
inventory): after ``failure_threshold`` failed checks in a row a host is down, and the
dispatcher marks its running ops ``lost``. A host that stops answering mid-op is marked
down at once; it comes back when a health check made after that succeeds, and
:meth:`Fleet.refresh` returns it then so its leftover containers can be reaped. A host
whose engine cannot run GPU containers is marked GPU-less.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import docker

from discovery.base import Host
from discovery.config import redact_url
from discovery.docker_engines import EngineEndpoint, engine_host
from discovery.health import GpuSnapshot, HostSnapshot, Inventory, publish_snapshot
from dispatcher.config import Config
from dispatcher.engine import DockerEngine, connect_docker
from dispatcher.errors import ConfigError, EngineUnreachable, InfrastructureError
from dispatcher.placement import Placement
from runner.protocol import now

log = logging.getLogger("ktrdr.fleet")


class Fleet:
    """Hosts and their engines."""

    def __init__(
        self,
        inventory: Inventory | None = None,
        fixed: list[tuple[Host, DockerEngine]] | None = None,
        *,
        failure_threshold: int = 3,
        call_timeout_s: float = 20.0,
    ) -> None:
        self.inventory = inventory
        self.failure_threshold = failure_threshold
        self.call_timeout_s = call_timeout_s
        self._failures: dict[str, int] = {}  # fixed host name -> failed checks in a row
        self._fixed = {host.name: host for host, _ in fixed or []}
        self._engines: dict[str, DockerEngine] = {host.name: engine for host, engine in fixed or []}
        self._owned: set[str] = set()
        self._down: dict[str, float] = {}  # host name -> when it was marked down
        self._no_gpu: set[str] = set()
        self._has_image: set[tuple[str, str]] = set()  # (engine, tag) known present
        self._lock = asyncio.Lock()

    @classmethod
    def single(cls, engine: DockerEngine, host: Host, *, failure_threshold: int = 3) -> Fleet:
        """One fixed host (no discovery)."""
        return cls(fixed=[(host, engine)], failure_threshold=failure_threshold)

    def all_hosts(self) -> list[Host]:
        """Every host we know, up or not."""
        hosts = dict(self._fixed)
        if self.inventory is not None:
            for status in self.inventory.hosts():
                hosts.setdefault(status.host.name, status.effective)
        return list(hosts.values())

    def hosts(self) -> list[Host]:
        """Hosts available for placement now."""
        hosts = list(self._fixed.values())
        if self.inventory is not None:
            hosts += [h for h in self.inventory.available() if h.name not in self._fixed]
        return [h for h in hosts if h.name not in self._down]

    def host(self, name: str) -> Host | None:
        """A known host by name."""
        return next((h for h in self.all_hosts() if h.name == name), None)

    async def refresh(self) -> list[str]:
        """Refresh the inventory and check the fixed engines (with a deadline each).

        Returns the hosts that answer again after being down (their leftover containers
        may need reaping). A host is back only after a successful check made after it was
        marked down.
        """
        known = [h.name for h in self.all_hosts()]
        was_down = {name for name in known if not self.usable(name)}
        if self.inventory is not None:
            await self.inventory.refresh()
            for status in self.inventory.hosts():
                since = self._down.get(status.host.name)
                if since is not None and status.state == "available" and status.failures == 0:
                    if status.checked_at > since:
                        del self._down[status.host.name]
        checks = [(name, self._engines[name]) for name in self._fixed if name in self._engines]
        results = await asyncio.gather(*(engine.alive() for _name, engine in checks))
        for (name, _engine), ok in zip(checks, results, strict=True):
            if ok:
                self._failures.pop(name, None)
                self._down.pop(name, None)
                continue
            self._failures[name] = self._failures.get(name, 0) + 1
            if self._failures[name] >= self.failure_threshold:
                self.mark_down(name, f"no answer to {self._failures[name]} health checks in a row")
        back = [name for name in was_down if self.usable(name)]
        for name in back:
            log.info("host %s answers again", name)
        return back

    def usable(self, host_name: str) -> bool:
        """Whether the host is up: not marked down and, if discovered, healthy."""
        if host_name in self._down:
            return False
        if self.inventory is not None and host_name not in self._fixed:
            status = self.inventory.health.status(host_name)
            return status is not None and status.state == "available"
        return True

    async def engine(self, host: Host) -> DockerEngine:
        """The engine of a host (connected on first use)."""
        async with self._lock:
            engine = self._engines.get(host.name)
            if engine is None:
                endpoint = EngineEndpoint.of(host)
                # control calls get the call deadline, not the health check's short timeout
                endpoint = dataclasses.replace(
                    endpoint, timeout_s=max(endpoint.timeout_s, self.call_timeout_s)
                )
                client = await asyncio.to_thread(endpoint.connect, name=host.name, pool_size=32)
                engine = DockerEngine(client, name=host.name, call_timeout_s=self.call_timeout_s)
                self._engines[host.name] = engine
                self._owned.add(host.name)
            return engine

    def own(self, host_names: Any) -> None:
        """Close these hosts' engines with the fleet (engines built for it)."""
        self._owned.update(host_names)

    def engines(self) -> list[tuple[Host, DockerEngine]]:
        """Engines connected so far, with their hosts."""
        return [(h, self._engines[h.name]) for h in self.all_hosts() if h.name in self._engines]

    async def ensure_image(self, engine: DockerEngine, tag: str, source: docker.DockerClient | None) -> None:
        """Make sure ``engine`` has image ``tag``: with no registry to pull from, an engine
        that lacks it gets it streamed from ``source`` (the engine it was built on)."""
        if (engine.name, tag) in self._has_image:
            return
        try:
            await engine.call(engine.client.images.get, tag)
        except EngineUnreachable:
            raise
        except InfrastructureError as missing:
            if source is None or source is engine.client:
                raise
            log.info("copying image %s to %s", tag, engine.name)

            def copy() -> None:
                engine.client.images.load(source.images.get(tag).save(named=True))

            try:
                await engine.call(copy, deadline_s=None)
            except InfrastructureError as exc:
                raise InfrastructureError(
                    f"{missing}; copying it from the local engine failed: {exc}"
                ) from None
        self._has_image.add((engine.name, tag))

    def mark_down(self, host_name: str, reason: str) -> None:
        """Stop placing on a host until it answers again."""
        if host_name not in self._down:
            log.warning("host %s is down: %s", host_name, reason)
        self._down[host_name] = time.time()

    def is_down(self, host_name: str) -> bool:
        """Whether a host is down (marked down, or failing its health checks)."""
        return not self.usable(host_name)

    def mark_no_gpu(self, host_name: str) -> None:
        """The host claims GPUs but its engine cannot run GPU containers."""
        if host_name not in self._no_gpu:
            log.warning("host %s has no usable GPU runtime; placing no GPU work there", host_name)
        self._no_gpu.add(host_name)

    def gpu_usable(self, host: Host) -> bool:
        """Whether GPU work can go to this host."""
        return bool(host.gpus) and host.name not in self._no_gpu

    def close(self) -> None:
        """Close the engines this fleet connected (fixed ones belong to the caller)."""
        for name in self._owned:
            self._engines[name].close()
        if self.inventory is not None:
            self.inventory.close()


async def publish_hosts(fleet: Fleet, placement: Placement, kv: Any) -> None:
    """Write the hosts snapshot (capacity, what is free, state) to KV ``ktrdr_hosts``."""
    hosts = fleet.all_hosts()
    await placement.refresh_usage(hosts)
    snapshots = []
    for host in hosts:
        used = placement.usage(host.name)
        state = "unhealthy" if fleet.is_down(host.name) else "available"
        if fleet.inventory is not None:
            status = fleet.inventory.health.status(host.name)
            if status is not None and status.state != "available":
                state = status.state
        snapshots.append(
            HostSnapshot(
                name=host.name,
                source=host.source,
                state=state,
                docker_url=redact_url(host.docker_url),
                cpus=host.cpus,
                memory_bytes=host.memory_bytes,
                gpus=[GpuSnapshot(index=g.index, model=g.model, memory_gb=g.memory_gb) for g in host.gpus],
                gpu_runtime=fleet.gpu_usable(host),
                free_cpus=max(0.0, host.cpus - used.cpus),
                free_memory_bytes=max(0, host.memory_bytes - used.memory_bytes),
                free_gpus=max(0, len(host.gpus) - len(used.gpu_ids)),
                running_ops=used.ops,
                checked_at=now(),
            )
        )
    await publish_snapshot(kv, snapshots)


async def build_fleet(config: Config) -> tuple[Fleet, docker.DockerClient | None]:
    """The fleet a ``[discovery]`` config describes: the local engine (unless
    ``local_engine = false``) as a fixed host, and every configured provider through a
    health-checked inventory. Also returns the local engine's client (None without one),
    where runner images are built."""
    disc = config.discovery
    fixed: list[tuple[Host, DockerEngine]] = []
    client: docker.DockerClient | None = None
    if disc.local_engine:
        client = await asyncio.to_thread(connect_docker, config.docker.url, timeout_s=config.docker.timeout_s)
        host = await asyncio.to_thread(engine_host, client, docker_url=config.docker.url)
        engine = DockerEngine(client, name=host.name, call_timeout_s=config.docker.call_timeout_s)
        fixed.append((host, engine))
    inventory = None
    if disc.engines or disc.proxmox or disc.gpu_hosts:
        inventory = Inventory.from_config(disc, local_url=None)
    if not fixed and inventory is None:
        raise ConfigError(
            "[discovery] local_engine = false and no engines, proxmox or gpu_hosts: no capacity"
        )
    fleet = Fleet(
        inventory,
        fixed,
        failure_threshold=disc.failure_threshold,
        call_timeout_s=config.docker.call_timeout_s,
    )
    fleet.own(h.name for h, _ in fixed)  # built here, closed with the fleet
    return fleet, client
