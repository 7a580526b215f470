"""One Docker engine: hardened container create, start, wait, inspect, logs, remove.

docker-py is synchronous; every call here runs on the engine's own thread pool, sized
for the dispatcher's concurrency, through one client with a matching connection pool.
Docker errors are translated into ours at this edge. No ``auto_remove`` and no
``containers.run()``: both race with wait/logs or leave Created containers behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

import docker
import docker.errors
import requests.exceptions

from dispatcher.errors import DockerUnavailable, EngineUnreachable, InfrastructureError
from runner.protocol import LABEL_DISPATCHER, LABEL_KIND, LABEL_OP_ID, SPEC_ENV, Resources

log = logging.getLogger("ktrdr.engine")

T = TypeVar("T")
RUNNER_USER = "65534:65534"
DATA_MOUNT = "/data"


@dataclass(frozen=True, slots=True)
class ContainerExit:
    """How a container ended."""

    exit_code: int
    oom_killed: bool
    error: str
    log_tail: list[str]


def connect_docker(url: str = "", *, timeout_s: float = 60.0, pool_size: int = 32) -> docker.DockerClient:
    """A client for the engine at ``url`` ("" = the default socket), checked with a ping."""
    try:
        client = (
            docker.DockerClient(base_url=url, timeout=int(timeout_s), max_pool_size=pool_size)
            if url
            else docker.from_env(timeout=int(timeout_s), max_pool_size=pool_size)
        )
        client.ping()
        return client
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        where = url or "the default socket (/var/run/docker.sock)"
        raise DockerUnavailable(
            f"no Docker engine answers at {where}: {exc}. Install and start Docker "
            "(Debian: apt-get install docker.io && dockerd &), or set [docker] url."
        ) from None


def hardened_host_config(
    api: docker.APIClient,
    resources: Resources,
    *,
    pids_limit: int,
    scratch_mb: int,
    data_dir: str = "",
    device_requests: list[docker.types.DeviceRequest] | None = None,
) -> dict[str, Any]:
    """The host config every op container gets: no privileges, read-only root, limits."""
    memory_bytes = int((resources.memory_gb or 1.0) * 1024**3)
    binds = {data_dir: {"bind": DATA_MOUNT, "mode": "ro"}} if data_dir else None
    return api.create_host_config(
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={scratch_mb}m,mode=1777"},
        mem_limit=memory_bytes,
        memswap_limit=memory_bytes,
        nano_cpus=int((resources.cpus or 1.0) * 1e9),
        pids_limit=pids_limit,
        init=True,
        binds=binds,
        device_requests=device_requests or None,
    )


class DockerEngine:
    """Async façade over one engine's blocking docker-py client."""

    def __init__(self, client: docker.DockerClient, *, name: str, workers: int = 32) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"docker-{name}")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking docker-py call on this engine's pool, translating its errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except docker.errors.ImageNotFound as exc:
            raise InfrastructureError(f"image missing on {self.name}: {exc.explanation}") from None
        except docker.errors.APIError as exc:
            raise InfrastructureError(f"engine {self.name} refused: {exc.explanation or exc}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise EngineUnreachable(f"engine {self.name} unreachable: {exc}") from None

    def bridge_gateway(self) -> str:
        """The host's address on the default bridge, as containers see it (blocking)."""
        network = self.api.inspect_network("bridge")
        for cfg in network.get("IPAM", {}).get("Config") or []:
            if cfg.get("Gateway"):
                return str(cfg["Gateway"])
        return "172.17.0.1"

    def runner_nats_url(self, nats_url: str) -> str:
        """The NATS URL a container on this engine should use (blocking).

        A loopback address means nothing inside a container: swap in the bridge gateway.
        """
        parsed = urlparse(nats_url)
        host = parsed.hostname or "127.0.0.1"
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return nats_url
        netloc = self.bridge_gateway() + (f":{parsed.port}" if parsed.port else "")
        if parsed.username:
            creds = parsed.username + (f":{parsed.password}" if parsed.password else "")
            netloc = f"{creds}@{netloc}"
        return urlunparse(parsed._replace(netloc=netloc))

    async def create(
        self,
        *,
        image: str,
        name: str,
        op_id: str,
        kind: str,
        dispatcher_id: str,
        spec_json: str,
        host_config: dict[str, Any],
    ) -> str:
        """Create (not start) the op's container; returns its id."""
        response = await self.call(
            self.api.create_container,
            image,
            name=name,
            user=RUNNER_USER,
            environment={SPEC_ENV: spec_json, "HOME": "/tmp"},
            labels={LABEL_OP_ID: op_id, LABEL_KIND: kind, LABEL_DISPATCHER: dispatcher_id},
            host_config=host_config,
            working_dir="/tmp",
        )
        return str(response["Id"])

    async def start(self, container_id: str) -> None:
        """Start a created container."""
        await self.call(self.api.start, container_id)

    async def wait(self, container_id: str) -> int:
        """Block (on the pool) until the container exits; returns its exit code."""
        result = await self.call(self.api.wait, container_id, timeout=None)
        return int(result.get("StatusCode", -1))

    async def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        try:
            await self.call(self.api.stop, container_id, timeout=max(0, round(grace_s)))
        except InfrastructureError as exc:
            log.info("stop %s: %s", container_id[:12], exc)

    async def conclude(self, container_id: str, tail_lines: int) -> ContainerExit:
        """Read how an exited container ended, and its last log lines."""
        attrs = await self.call(self.api.inspect_container, container_id)
        state = attrs.get("State", {})
        raw = b""
        if tail_lines:
            raw = await self.call(self.api.logs, container_id, stdout=True, stderr=True, tail=tail_lines)
        lines = raw.decode("utf-8", "replace").splitlines()[-tail_lines:] if raw else []
        return ContainerExit(
            exit_code=int(state.get("ExitCode", -1)),
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
            log_tail=lines,
        )

    async def remove(self, container_id: str) -> None:
        """Remove the container (forcefully); a container already gone is fine."""
        try:
            await self.call(self.api.remove_container, container_id, force=True, v=True)
        except InfrastructureError as exc:
            if "No such container" not in str(exc) and "404" not in str(exc):
                raise

    async def alive(self) -> bool:
        """Whether the engine answers a ping now."""
        try:
            await self.call(self.client.ping)
            return True
        except InfrastructureError:
            return False

    def close(self) -> None:
        """Release the pool and the client."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
