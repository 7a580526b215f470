"""Health of discovered hosts, the inventory of every provider's hosts, and the
``ktrdr_hosts`` KV snapshot.

States of a host:

- ``available``: its engine answered the last check, or has failed fewer than
  ``failure_threshold`` checks in a row since it last answered;
- ``unhealthy``: ``failure_threshold`` failed checks in a row, or it has never answered;
- ``gone``: its provider no longer lists it, or it stayed unhealthy for more than
  ``gone_after_checks`` checks. A gone host is reported once (its KV key is deleted) and
  then forgotten; if it is discovered again it starts afresh.

A check asks the engine for ``/info`` (one request: a ping that also reads the engine's
CPUs, memory and runtimes). CPUs / memory a provider left at 0 (a static host without
them in the config, an engine that was down at discovery) are filled in from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import docker
import docker.errors
import msgspec
import requests.exceptions
from msgspec import Struct

from discovery.base import CapacityProvider, DiscoveryError, Host
from discovery.config import DiscoveryConfig, redact_url
from discovery.docker_engines import (
    DockerEngineProvider,
    EngineEndpoint,
    LocalEngineProvider,
    connect_host,
)
from discovery.proxmox import ProxmoxProvider
from discovery.static import StaticGpuProvider

log = logging.getLogger("ktrdr.discovery.health")

HostState = Literal["available", "unhealthy", "gone"]
_KEY_SAFE = re.compile(r"[-/_a-zA-Z0-9]")


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What an engine said about itself at the last successful check."""

    cpus: float
    memory_bytes: int
    gpu_runtime: bool
    engine_name: str = ""
    server_version: str = ""


@dataclass
class HostStatus:
    """One host as the inventory tracks it."""

    host: Host
    state: HostState = "unhealthy"
    failures: int = 0
    unhealthy_checks: int = 0
    ever_ok: bool = False
    error: str = ""
    checked_at: float = 0.0
    facts: EngineFacts | None = None
    gone_reason: str = ""

    @property
    def effective(self) -> Host:
        """The host with capacity the provider did not know filled in from the engine."""
        facts = self.facts
        if facts is None:
            return self.host
        return dataclasses.replace(
            self.host,
            cpus=self.host.cpus if self.host.cpus > 0 else facts.cpus,
            memory_bytes=self.host.memory_bytes if self.host.memory_bytes > 0 else facts.memory_bytes,
            gpu_runtime=self.host.gpu_runtime or facts.gpu_runtime,
        )


class HostHealth:
    """Per-host health from consecutive check results."""

    def __init__(self, *, failure_threshold: int = 3, gone_after_checks: int = 30, workers: int = 16) -> None:
        self.failure_threshold = failure_threshold
        self.gone_after_checks = gone_after_checks
        self._status: dict[str, HostStatus] = {}
        self._clients: dict[str, tuple[EngineEndpoint, docker.DockerClient]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health")

    # -- state ----------------------------------------------------------------------------

    def status(self, name: str) -> HostStatus | None:
        """The tracked status of a host, or None."""
        return self._status.get(name)

    def statuses(self) -> list[HostStatus]:
        """Every tracked host, gone ones included until forgotten."""
        return list(self._status.values())

    def track(self, host: Host) -> HostStatus:
        """Start tracking a host, or update the description of a tracked one."""
        status = self._status.get(host.name)
        if status is None or status.state == "gone":
            status = HostStatus(host=host)
            self._status[host.name] = status
        else:
            status.host = host
        return status

    def record(self, name: str, ok: bool, error: str = "", facts: EngineFacts | None = None) -> HostStatus:
        """Fold one check result into the host's state."""
        status = self._status[name]
        status.checked_at = time.time()
        if ok:
            status.failures = 0
            status.unhealthy_checks = 0
            status.ever_ok = True
            status.error = ""
            status.state = "available"
            if facts is not None:
                status.facts = facts
            return status
        status.failures += 1
        status.error = error
        if not status.ever_ok or status.failures >= self.failure_threshold:
            status.state = "unhealthy"
            status.unhealthy_checks += 1
            if status.unhealthy_checks > self.gone_after_checks:
                self.mark_gone(name, f"unhealthy for {status.unhealthy_checks} checks: {error}")
        return status

    def mark_gone(self, name: str, reason: str) -> None:
        """The host is gone (no longer discovered, or unhealthy too long)."""
        status = self._status.get(name)
        if status is None:
            return
        status.state = "gone"
        status.gone_reason = reason
        self._drop_client(name)

    def forget_gone(self) -> list[str]:
        """Stop tracking hosts already reported gone; returns their names."""
        gone = [name for name, s in self._status.items() if s.state == "gone"]
        for name in gone:
            del self._status[name]
        return gone

    # -- checking -------------------------------------------------------------------------

    def _drop_client(self, name: str) -> None:
        entry = self._clients.pop(name, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                entry[1].close()

    def _probe(self, host: Host) -> EngineFacts:
        """Ask the host's engine for /info (blocking); DiscoveryError when it fails."""
        endpoint = EngineEndpoint.of(host)
        entry = self._clients.get(host.name)
        if entry is None or entry[0] != endpoint:
            self._drop_client(host.name)
            entry = (endpoint, connect_host(host, pool_size=2))
            self._clients[host.name] = entry
        try:
            info: dict[str, Any] = entry[1].info()
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            self._drop_client(host.name)
            raise DiscoveryError(
                f"engine {host.name} at {redact_url(host.docker_url) or 'the default socket'} stopped "
                f"answering: {type(exc).__name__}: {exc}"
            ) from None
        return EngineFacts(
            cpus=float(info.get("NCPU") or 0),
            memory_bytes=int(info.get("MemTotal") or 0),
            gpu_runtime="nvidia" in (info.get("Runtimes") or {}),
            engine_name=str(info.get("Name") or ""),
            server_version=str(info.get("ServerVersion") or ""),
        )

    async def check(self, host: Host) -> bool:
        """Check one host's engine (off the event loop) and record the result."""
        self.track(host)
        timeout = EngineEndpoint.of(host).timeout_s * 2 + 5
        loop = asyncio.get_running_loop()
        try:
            facts = await asyncio.wait_for(loop.run_in_executor(self._pool, self._probe, host), timeout)
        except DiscoveryError as exc:
            self.record(host.name, False, str(exc))
            return False
        except TimeoutError:
            self._drop_client(host.name)
            self.record(host.name, False, f"engine {host.name} did not answer within {timeout:g}s")
            return False
        self.record(host.name, True, facts=facts)
        return True

    def close(self) -> None:
        """Close cached engine clients and the check pool."""
        for name in list(self._clients):
            self._drop_client(name)
        self._pool.shutdown(wait=False, cancel_futures=True)


class GpuSnapshot(Struct, frozen=True, kw_only=True):
    """One GPU of a host in the snapshot."""

    index: int
    model: str = ""
    memory_gb: float = 0.0
    device_id: str = ""


class HostSnapshot(Struct, frozen=True, kw_only=True):
    """A host and its free capacity, as published in KV ``ktrdr_hosts`` (one key per host)."""

    name: str
    source: str
    state: str
    docker_url: str = ""
    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: list[GpuSnapshot] = []
    gpu_runtime: bool = False
    free_cpus: float = 0.0
    free_memory_bytes: int = 0
    free_gpus: int = 0
    running_ops: int = 0
    checked_at: float = 0.0
    failures: int = 0
    error: str = ""
    labels: dict[str, str] = {}
    #: The operator's labels (what ``resources.host_labels`` matches).
    tags: dict[str, str] = {}


def snapshot_of(
    status: HostStatus,
    *,
    used_cpus: float = 0.0,
    used_memory_bytes: int = 0,
    used_gpus: int = 0,
    running_ops: int = 0,
) -> HostSnapshot:
    """The snapshot of one tracked host, given what is reserved on it (no secrets)."""
    host = status.effective
    return HostSnapshot(
        name=host.name,
        source=host.source,
        state=status.state,
        docker_url=redact_url(host.docker_url),
        cpus=host.cpus,
        memory_bytes=host.memory_bytes,
        gpus=[
            GpuSnapshot(index=g.index, model=g.model, memory_gb=g.memory_gb, device_id=g.device_id)
            for g in host.gpus
        ],
        gpu_runtime=host.gpu_runtime,
        free_cpus=max(0.0, host.cpus - used_cpus),
        free_memory_bytes=max(0, host.memory_bytes - used_memory_bytes),
        free_gpus=max(0, len(host.gpus) - used_gpus),
        running_ops=running_ops,
        checked_at=status.checked_at,
        failures=status.failures,
        error=status.gone_reason or status.error,
        labels={k: redact_url(v) for k, v in host.labels.items()},
        tags=dict(host.tags),
    )


def kv_key(name: str) -> str:
    """A KV key for a host name: characters outside ``[-/_a-zA-Z0-9]`` (``.``, ``=`` and
    ``:`` included) become ``=XX`` per UTF-8 byte, so distinct names stay distinct and the
    key is always valid (``pve:pve1/101:w1`` → ``pve=3Apve1/101=3Aw1``)."""
    out = []
    for char in name:
        if _KEY_SAFE.fullmatch(char):
            out.append(char)
        else:
            out.extend(f"={byte:02X}" for byte in char.encode())
    return "".join(out) or "=00"


async def publish_snapshot(kv: Any, snapshots: Sequence[HostSnapshot], *, prune: bool = False) -> None:
    """Write one key per host into the ``ktrdr_hosts`` bucket; delete the keys of gone
    hosts. With ``prune``, also delete every key not among ``snapshots`` (use only when
    this process is the one publisher)."""
    from nats.js.errors import KeyNotFoundError

    from dispatcher.kvwatch import current_entries

    keep: set[str] = set()
    for snap in snapshots:
        key = kv_key(snap.name)
        if snap.state == "gone":
            with contextlib.suppress(KeyNotFoundError):
                await kv.delete(key)
            continue
        keep.add(key)
        await kv.put(key, msgspec.json.encode(snap))
    if prune:
        for entry in await current_entries(kv):
            if entry.key not in keep:
                await kv.delete(entry.key)


async def read_snapshot(kv: Any) -> list[HostSnapshot]:
    """Every host snapshot in the bucket, by name."""
    from dispatcher.kvwatch import current_entries

    out = []
    for entry in await current_entries(kv):
        with contextlib.suppress(msgspec.DecodeError):
            out.append(msgspec.json.decode(entry.value, type=HostSnapshot))
    return sorted(out, key=lambda s: s.name)


#: Reserved capacity per host name: (cpus, memory bytes, gpus, running ops).
UsageFn = Callable[[str], tuple[float, int, int, int]]


class Inventory:
    """Every provider's hosts, rediscovered on an interval and health-checked."""

    def __init__(
        self,
        providers: Sequence[CapacityProvider],
        *,
        rediscover_s: float = 60.0,
        failure_threshold: int = 3,
        gone_after_checks: int = 30,
    ) -> None:
        self.providers = list(providers)
        self.rediscover_s = rediscover_s
        self.health = HostHealth(failure_threshold=failure_threshold, gone_after_checks=gone_after_checks)
        #: The last discovery error of each provider ("" when it worked).
        self.provider_errors: dict[str, str] = {}
        self._owner: dict[str, str] = {}  # host name -> provider name
        self._discovered_at = float("-inf")

    @classmethod
    def from_config(
        cls, config: DiscoveryConfig, *, local_url: str | None = "", local_timeout_s: float = 10.0
    ) -> Inventory:
        """The inventory of a ``[discovery]`` config (``local_url`` None: no local engine)."""
        return cls(
            build_providers(config, local_url=local_url, local_timeout_s=local_timeout_s),
            rediscover_s=config.rediscover_s,
            failure_threshold=config.failure_threshold,
            gone_after_checks=config.gone_after_checks,
        )

    async def discover(self) -> None:
        """Ask every provider (concurrently, off the loop) for its hosts. A provider that
        fails keeps its previous hosts (they are still health-checked)."""
        results = await asyncio.gather(
            *(asyncio.to_thread(p.discover) for p in self.providers), return_exceptions=True
        )
        for provider, result in zip(self.providers, results, strict=True):
            if isinstance(result, BaseException):
                message = (
                    str(result)
                    if isinstance(result, DiscoveryError)
                    else f"{type(result).__name__}: {result}"
                )
                self.provider_errors[provider.name] = message
                log.warning("discovery %s failed: %s", provider.name, message)
                continue
            self.provider_errors[provider.name] = ""
            seen = set()
            for host in result:
                owner = self._owner.setdefault(host.name, provider.name)
                if owner != provider.name:
                    log.warning(
                        "host %s found by %s and %s; keeping %s's", host.name, owner, provider.name, owner
                    )
                    continue
                seen.add(host.name)
                self.health.track(host)
            for name, owner in list(self._owner.items()):
                if owner == provider.name and name not in seen:
                    self.health.mark_gone(name, f"no longer discovered by {provider.name}")
                    del self._owner[name]
        self._discovered_at = time.monotonic()

    async def refresh(self, *, rediscover: bool | None = None) -> list[HostStatus]:
        """Forget hosts reported gone last time, rediscover when due (or when asked), check
        every host. Returns every status, hosts that went gone in this refresh included."""
        for name in self.health.forget_gone():
            self._owner.pop(name, None)
        due = time.monotonic() - self._discovered_at >= self.rediscover_s
        if rediscover or (rediscover is None and due):
            await self.discover()
        live = [s.host for s in self.health.statuses() if s.state != "gone"]
        await asyncio.gather(*(self.health.check(h) for h in live))
        return self.health.statuses()

    def hosts(self) -> list[HostStatus]:
        """Every tracked host that is not gone."""
        return [s for s in self.health.statuses() if s.state != "gone"]

    def available(self) -> list[Host]:
        """Hosts whose engine answers and whose capacity is known."""
        return [
            s.effective
            for s in self.health.statuses()
            if s.state == "available" and s.effective.cpus > 0 and s.effective.memory_bytes > 0
        ]

    def snapshots(self, usage: UsageFn | None = None) -> list[HostSnapshot]:
        """Snapshots of every tracked host (gone ones too, so their keys get deleted)."""
        out = []
        for status in self.health.statuses():
            cpus, memory, gpus, running = usage(status.host.name) if usage else (0.0, 0, 0, 0)
            out.append(
                snapshot_of(
                    status, used_cpus=cpus, used_memory_bytes=memory, used_gpus=gpus, running_ops=running
                )
            )
        return out

    async def run(
        self,
        stop: asyncio.Event,
        *,
        interval_s: float,
        kv: Any = None,
        usage: UsageFn | None = None,
        on_refresh: Callable[[list[HostStatus]], None] | None = None,
    ) -> None:
        """Refresh every ``interval_s`` until ``stop`` is set, publishing the snapshot to
        ``kv`` (the ``ktrdr_hosts`` bucket) when given."""
        while not stop.is_set():
            try:
                statuses = await self.refresh()
                if on_refresh is not None:
                    on_refresh(statuses)
                if kv is not None:
                    await publish_snapshot(kv, self.snapshots(usage))
            except Exception:
                log.exception("host refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def close(self) -> None:
        """Release engine clients."""
        self.health.close()


def build_providers(
    config: DiscoveryConfig, *, local_url: str | None = "", local_timeout_s: float = 10.0
) -> list[CapacityProvider]:
    """The providers a ``[discovery]`` config asks for, the local engine first (unless
    ``local_url`` is None or ``config.local_engine`` is false)."""
    providers: list[CapacityProvider] = []
    if local_url is not None and config.local_engine:
        providers.append(LocalEngineProvider(local_url, timeout_s=local_timeout_s))
    if config.engines:
        providers.append(DockerEngineProvider(config.engines))
    providers.extend(ProxmoxProvider(p) for p in config.proxmox)
    if config.gpu_hosts:
        providers.append(StaticGpuProvider(config.gpu_hosts))
    return providers
