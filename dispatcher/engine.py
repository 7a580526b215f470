"""One Docker engine: hardened container create, start, exit watching, inspect, logs, remove.

docker-py is synchronous. Control calls (create, start, stop, inspect, remove) run on the
engine's own thread pool and each has a deadline: an engine that stops answering without
closing its connections raises :class:`EngineUnreachable` instead of hanging the caller.
Long-lived reads (log follows) run on a separate pool, so they can never starve control
calls. Container exits come from one events stream per engine (filtered by our label),
not from one blocking ``wait`` per op; a periodic listing catches exits the stream missed
while it reconnected. Docker errors are translated into ours at this edge. No
``auto_remove`` and no ``containers.run()``: both race with wait/logs or leave Created
containers behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

import docker
import docker.errors
import requests.exceptions

from dispatcher.errors import DockerUnavailable, EngineGone, EngineUnreachable, InfrastructureError
from runner.protocol import (
    LABEL_ATTEMPT,
    LABEL_CLUSTER,
    LABEL_DISPATCHER,
    LABEL_KIND,
    LABEL_OP_ID,
    POOL_READY_LINE,
    SPEC_ENV,
    Resources,
)

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


#: The network op containers join on every engine: a bridge with inter-container traffic
#: off, so a container reaches its host's gateway (NATS) but no other container.
RUNNER_NETWORK = "ktrdr-runners"


_network_lock = threading.Lock()  # one create at a time in this process (engines allow twins)


def _runner_network(api: docker.APIClient) -> dict[str, Any] | None:
    """The runners' network, None when missing. Docker allows two networks of one name
    (two creates racing): the oldest is kept and the others removed (those still in use
    stay, and are not ours to choose)."""
    found = [n for n in api.networks(names=[RUNNER_NETWORK]) if n.get("Name") == RUNNER_NETWORK]
    if not found:
        return None
    found.sort(key=lambda n: (str(n.get("Created", "")), str(n["Id"])))
    for twin in found[1:]:
        with contextlib.suppress(docker.errors.APIError):
            api.remove_network(twin["Id"])
    return dict(api.inspect_network(found[0]["Id"]))


def ensure_runner_network(api: docker.APIClient, engine_name: str) -> str:
    """Create the runners' network on an engine if it is missing; its gateway (the host
    as containers there see it). Blocking."""
    with _network_lock:
        network = _runner_network(api)
        refusal = ""
        if network is None:
            try:
                api.create_network(
                    RUNNER_NETWORK,
                    driver="bridge",
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    labels={"ktrdr.network": "runners"},
                    check_duplicate=True,
                )
            except docker.errors.APIError as exc:  # or created by a peer meanwhile: looked up below
                refusal = f": {exc.explanation or exc}"
            network = _runner_network(api)
    if network is None:
        raise InfrastructureError(f"engine {engine_name}: could not create network {RUNNER_NETWORK}{refusal}")
    options = network.get("Options") or {}
    if options.get("com.docker.network.bridge.enable_icc") != "false":
        raise InfrastructureError(
            f"engine {engine_name}: network {RUNNER_NETWORK} lets containers reach one another "
            f"(enable_icc is not false); remove it (docker network rm {RUNNER_NETWORK}) to have it remade"
        )
    for cfg in network.get("IPAM", {}).get("Config") or []:
        if cfg.get("Gateway"):
            return str(cfg["Gateway"])
    raise InfrastructureError(f"engine {engine_name}: network {RUNNER_NETWORK} has no gateway address")


def hardened_host_config(
    api: docker.APIClient,
    resources: Resources,
    *,
    pids_limit: int,
    scratch_mb: int,
    data_dir: str = "",
    device_requests: list[docker.types.DeviceRequest] | None = None,
    network: str = RUNNER_NETWORK,
) -> dict[str, Any]:
    """The host config every op container gets: no privileges, read-only root, limits,
    and the runners' own network (containers there cannot reach one another)."""
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
        network_mode=network,
    )


def _refused(exc: BaseException) -> bool:
    """Whether a connection error means nothing listens (not a timeout)."""
    text = str(exc)
    return "Connection refused" in text or "No such file or directory" in text


class ContainerVanished(InfrastructureError):
    """The container is gone from its engine (removed by someone else)."""


class ExitWatcher:
    """Exits of this engine's op containers, from one events stream.

    A reader thread follows ``docker events`` (type container, event die, our label) and
    resolves the waiters; it reconnects with ``since`` after an error. Every ``poll_s`` a
    listing of our containers catches an exit the stream missed, and a container that
    vanished. Recent exits are remembered, so a waiter that registers after the event
    still gets it.
    """

    def __init__(self, engine: DockerEngine, *, poll_s: float = 2.0, remember_s: float = 600.0) -> None:
        self._engine = engine
        self._poll_s = poll_s
        self._remember_s = remember_s
        self._waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._exits: dict[str, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._closed = threading.Event()
        self._stream: Any = None

    def _start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_events, name=f"events-{self._engine.name}", daemon=True).start()
        self._poller = self._loop.create_task(self._poll())

    def _read_events(self) -> None:
        since: float | None = None
        while not self._closed.is_set():
            try:
                self._stream = self._engine.api.events(
                    since=since,
                    filters={"type": "container", "event": "die", "label": LABEL_OP_ID},
                    decode=True,
                )
                for event in self._stream:
                    since = float(event.get("time") or time.time())
                    attrs = (event.get("Actor") or {}).get("Attributes") or {}
                    cid = str(event.get("id") or (event.get("Actor") or {}).get("ID") or "")
                    code = int(attrs.get("exitCode", -1))
                    if cid and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._resolve, cid, code)
            except Exception as exc:  # noqa: BLE001 - the engine went away: reconnect below
                if self._closed.is_set():
                    return
                log.debug("events stream of %s broke (%s); reconnecting", self._engine.name, exc)
            if self._closed.wait(1.0):
                return
            since = since or time.time() - 5.0

    def _resolve(self, container_id: str, exit_code: int) -> None:
        now_s = time.monotonic()
        self._exits[container_id] = (exit_code, now_s)
        for waiter in self._waiters.pop(container_id, []):
            if not waiter.done():
                waiter.set_result(exit_code)
        if len(self._exits) > 256:
            for cid, (_code, seen) in list(self._exits.items()):
                if now_s - seen > self._remember_s:
                    del self._exits[cid]

    def _vanished(self, container_id: str) -> None:
        gone = ContainerVanished(f"container {container_id[:12]} vanished from {self._engine.name}")
        for waiter in self._waiters.pop(container_id, []):
            if not waiter.done():
                waiter.set_exception(gone)

    async def _poll(self) -> None:
        while not self._closed.is_set():
            await asyncio.sleep(self._poll_s)
            if self._waiters:
                with contextlib.suppress(Exception):
                    await self._check_listed(list(self._waiters))

    async def _check_listed(self, container_ids: list[str]) -> None:
        """Resolve waiters of containers that already exited or vanished (one listing)."""
        listed = await self._engine.call(
            self._engine.api.containers, all=True, filters={"label": LABEL_OP_ID}
        )
        states = {c["Id"]: c.get("State", "") for c in listed}
        for cid in container_ids:
            state = states.get(cid)
            if state is None:
                self._vanished(cid)
            elif state in ("exited", "dead"):
                attrs = await self._engine.call(self._engine.api.inspect_container, cid)
                self._resolve(cid, int(attrs.get("State", {}).get("ExitCode", -1)))

    async def wait(self, container_id: str) -> int:
        """The container's exit code, once it has exited."""
        self._start()
        if container_id in self._exits:
            return self._exits[container_id][0]
        assert self._loop is not None
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._waiters.setdefault(container_id, []).append(waiter)
        try:
            await self._check_one(container_id)  # it may have exited before we listened
        except EngineUnreachable:
            pass  # the stream and the poll keep trying; the dispatcher's health check decides
        return await waiter

    async def _check_one(self, container_id: str) -> None:
        """Resolve the waiters of one container if it already exited or vanished."""
        try:
            attrs = await self._engine.call(self._engine.api.inspect_container, container_id)
        except EngineUnreachable:
            raise
        except InfrastructureError:  # no such container
            self._vanished(container_id)
            return
        state = attrs.get("State", {})
        if state.get("Status") in ("exited", "dead"):
            self._resolve(container_id, int(state.get("ExitCode", -1)))

    def close(self) -> None:
        """Stop the reader thread and the poll."""
        self._closed.set()
        if self._poller is not None:
            self._poller.cancel()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()


class DockerEngine:
    """Async façade over one engine's blocking docker-py client."""

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        name: str,
        workers: int = 32,
        call_timeout_s: float = 20.0,
        stream_workers: int = 1024,
    ) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.name = name
        self.call_timeout_s = call_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"docker-{name}")
        # log follows hold a thread each for an op's life: never on the control pool
        self._stream_pool = ThreadPoolExecutor(
            max_workers=stream_workers, thread_name_prefix=f"stream-{name}"
        )
        self.exits = ExitWatcher(self)
        self._network_ready = False

    async def call(
        self, fn: Callable[..., T], *args: Any, deadline_s: float | None = -1.0, **kwargs: Any
    ) -> T:
        """Run a blocking docker-py call on this engine's pool, translating its errors.

        The call must answer within ``deadline_s`` (default: the engine's
        ``call_timeout_s``; None: no deadline, for long transfers) or
        :class:`EngineUnreachable` is raised.
        """
        loop = asyncio.get_running_loop()
        limit_s = self.call_timeout_s if deadline_s == -1.0 else deadline_s
        try:
            future = loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
            if limit_s is None:
                return await future
            return await asyncio.wait_for(future, limit_s)
        except TimeoutError:
            raise EngineUnreachable(
                f"engine {self.name} did not answer within {limit_s:g}s (host down or stalled?)"
            ) from None
        except docker.errors.ImageNotFound as exc:
            raise InfrastructureError(f"image missing on {self.name}: {exc.explanation}") from None
        except docker.errors.APIError as exc:
            raise InfrastructureError(f"engine {self.name} refused: {exc.explanation or exc}") from None
        except requests.exceptions.ConnectionError as exc:
            if _refused(exc):
                raise EngineGone(f"engine {self.name} refuses connections: {exc}") from None
            raise EngineUnreachable(f"engine {self.name} unreachable: {exc}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise EngineUnreachable(f"engine {self.name} unreachable: {exc}") from None

    async def stream(self, fn: Callable[[], T]) -> T:
        """Run a long blocking read (a log follow) on the stream pool, no deadline."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._stream_pool, fn)
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise EngineUnreachable(f"engine {self.name} unreachable: {exc}") from None

    def ensure_runner_network(self) -> str:
        """Create the runners' network on this engine if missing; its gateway. Blocking."""
        return ensure_runner_network(self.api, self.name)

    def runner_nats_url(self, nats_url: str) -> str:
        """The NATS URL a container on this engine should use (blocking).

        A loopback address means nothing inside a container: swap in the gateway of the
        runners' network (created here if missing). ``nats_url`` may be a comma-separated
        list (a cluster's nodes): each URL of it is swapped.
        """
        gateway: list[str] = []  # looked up once, and only when some URL needs it

        def one(url: str) -> str:
            parsed = urlparse(url if "://" in url else f"nats://{url}")
            host = parsed.hostname or "127.0.0.1"
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                return url
            if not gateway:
                gateway.append(self.ensure_runner_network())
            netloc = gateway[0] + (f":{parsed.port}" if parsed.port else "")
            if parsed.username:
                creds = parsed.username + (f":{parsed.password}" if parsed.password else "")
                netloc = f"{creds}@{netloc}"
            return urlunparse(parsed._replace(netloc=netloc))

        urls = [part.strip() for part in nats_url.split(",") if part.strip()]
        if len(urls) <= 1:
            return one(nats_url)
        return ",".join(one(url) for url in urls)

    async def create(
        self,
        *,
        image: str,
        name: str,
        op_id: str,
        kind: str,
        dispatcher_id: str,
        attempt: int,
        deployment: str,
        spec_json: str,
        host_config: dict[str, Any],
        stdin_secret: bool = False,
    ) -> str:
        """Create (not start) the op's container; returns its id. With ``stdin_secret``
        its standard input stays open for :meth:`start` to write a secret into."""

        async def create_once() -> str:
            response = await self.call(
                self.api.create_container,
                image,
                name=name,
                user=RUNNER_USER,
                environment={SPEC_ENV: spec_json, "HOME": "/tmp"},
                labels={
                    LABEL_OP_ID: op_id,
                    LABEL_KIND: kind,
                    LABEL_DISPATCHER: dispatcher_id,
                    LABEL_ATTEMPT: str(attempt),
                    LABEL_CLUSTER: deployment,
                },
                host_config=host_config,
                working_dir="/tmp",
                # with detach=False docker-py also sets StdinOnce: stdin closes after the
                # one attach that writes the secret, so the runner reads it to its end
                stdin_open=stdin_secret,
            )
            return str(response["Id"])

        if not self._network_ready:
            await self.call(self.ensure_runner_network)
            self._network_ready = True
        try:
            return await create_once()
        except InfrastructureError as exc:
            if RUNNER_NETWORK not in str(exc):
                raise
            # the network was removed since: make it again, once
            await self.call(self.ensure_runner_network)
            return await create_once()

    async def start(self, container_id: str, stdin: bytes = b"") -> None:
        """Start a created container; ``stdin`` (a secret: the op's credentials) is written
        to its standard input, which then closes. Secrets go this way, never into the
        environment or labels, which ``docker inspect`` shows to anyone with the engine."""
        if not stdin:
            await self.call(self.api.start, container_id)
            return
        await self.call(self._start_with_stdin, container_id, stdin)

    def _start_with_stdin(self, container_id: str, data: bytes) -> None:
        attached = self.api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        sock = getattr(attached, "_sock", attached)  # the raw socket under docker-py's wrapper
        try:
            self.api.start(container_id)
            sock.sendall(data)
            # end of input, even where the HTTP response still holds the socket open (TLS)
            sock.shutdown(socket.SHUT_WR)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(OSError):
                attached.close()

    async def wait(self, container_id: str) -> int:
        """Until the container exits (from the events stream); returns its exit code.
        :class:`ContainerVanished` when it was removed by someone else."""
        return await self.exits.wait(container_id)

    async def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``. A refusal (already stopped, gone) is
        logged; an engine that does not answer raises :class:`EngineUnreachable`."""
        grace = max(0, round(grace_s))
        try:
            await self.call(
                self.api.stop, container_id, timeout=grace, deadline_s=grace + self.call_timeout_s
            )
        except EngineUnreachable:
            raise
        except InfrastructureError as exc:
            log.info("stop %s: %s", container_id[:12], exc)

    async def conclude(self, container_id: str, tail_lines: int) -> ContainerExit:
        """Read how an exited container ended, and its last log lines."""
        attrs = await self.call(self.api.inspect_container, container_id)
        state = attrs.get("State", {})
        raw = b""
        if tail_lines:
            raw = await self.call(self.api.logs, container_id, stdout=True, stderr=True, tail=tail_lines)
        lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line != POOL_READY_LINE]
        lines = lines[-tail_lines:]
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
            gone = ("No such container", "404", "is already in progress")
            if not any(text in str(exc) for text in gone):
                raise

    async def alive(self) -> bool:
        """Whether the engine answers a ping now."""
        try:
            await self.call(self.client.ping)
            return True
        except InfrastructureError:
            return False

    def close(self) -> None:
        """Release the pools, the exit watcher and the client."""
        self.exits.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
