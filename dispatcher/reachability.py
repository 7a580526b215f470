"""Can op containers reach NATS at the URL the dispatcher hands them?

Checked once per host when a dispatcher starts (from inside a container, the way a runner
would connect), and explained when a runner fails to connect: the most common cause is a
nats-server that listens on 127.0.0.1 only, which containers can never reach.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

from dispatcher.engine import DockerEngine, hardened_host_config
from dispatcher.errors import InfrastructureError
from dispatcher.fleet import Fleet
from runner.protocol import LABEL_CLUSTER, LABEL_OP_ID, Resources
from runner.transport import redact_url

log = logging.getLogger("ktrdr.reachability")

_PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "except OSError as exc:\n"
    "    print(exc); sys.exit(1)\n"
)


def _answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _host_port(url: str) -> tuple[str, int]:
    url = url.split(",")[0].strip()  # a cluster's list: its first node stands for all
    parsed = urlparse(url if "://" in url else f"nats://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


def hint(url: str) -> str:
    """What to change when containers cannot reach NATS at ``url`` (blocking: it tries the
    address from this machine, and 127.0.0.1 on the same port)."""
    host, port = _host_port(url)
    if _answers(host, port):
        return (
            f"this machine reaches {host}:{port}, so something between the containers and NATS blocks "
            f"it (a firewall?); set [nats] runner_url (or the host's nats_url) to an address the "
            f"containers can reach"
        )
    if _answers("127.0.0.1", port):
        return (
            f"nats-server listens on 127.0.0.1 only; containers reach this host at {host}: make it "
            f"listen on 0.0.0.0 (or {host}), or set [nats] runner_url to an address containers can reach"
        )
    return (
        f"nothing answers at {host}:{port} even from this machine: is nats-server running there, "
        f"and is [nats] runner_url right?"
    )


async def check_from_container(engine: DockerEngine, image: str, url: str, deployment: str) -> str:
    """Empty when a container on ``engine`` reaches ``url``; otherwise why not (a sentence)."""
    host, port = _host_port(url)
    host_config = hardened_host_config(
        engine.api, Resources(cpus=0.1, memory_gb=0.125), pids_limit=32, scratch_mb=16
    )
    container_id = ""
    try:
        await engine.call(engine.ensure_runner_network)
        response = await engine.call(
            engine.api.create_container,
            image,
            command=["/opt/ktrdr/venv/bin/python", "-c", _PROBE, host, str(port)],
            entrypoint=[],
            user="65534:65534",
            labels={LABEL_OP_ID: "reachability-check", LABEL_CLUSTER: deployment},
            host_config=host_config,
        )
        container_id = str(response["Id"])
        await engine.call(engine.api.start, container_id)
        result = await engine.call(engine.api.wait, container_id, timeout=15, deadline_s=20.0)
        if int(result.get("StatusCode", 1)) == 0:
            return ""
        output = await engine.call(engine.api.logs, container_id, stdout=True, stderr=True)
        said = output.decode("utf-8", "replace").strip().splitlines()
        last = said[-1] if said else "no answer"
        return f"containers on {engine.name} cannot reach NATS at {redact_url(url)} ({last})"
    except InfrastructureError as exc:
        log.info("reachability check on %s could not run: %s", engine.name, exc)
        return ""
    finally:
        if container_id:
            try:
                await engine.remove(container_id)
            except InfrastructureError as exc:
                log.info("reachability check container on %s not removed: %s", engine.name, exc)


async def problem(engine: DockerEngine, url: str, *, image: str | None, deployment: str) -> str:
    """Empty when op containers on ``engine`` can reach NATS at ``url``; otherwise what is
    wrong and what to change. With ``image`` it is checked from a container, as a runner
    connects; without, quickly from this machine only (it catches a server that listens
    on 127.0.0.1 alone)."""
    if image is None:
        host, port = _host_port(url)
        if await asyncio.to_thread(_answers, host, port):
            return ""
        return f"containers may not reach NATS at {redact_url(url)}: {await asyncio.to_thread(hint, url)}"
    found = await check_from_container(engine, image, url, deployment)
    return f"{found}; {await asyncio.to_thread(hint, url)}" if found else ""


async def check_fleet(
    fleet: Fleet,
    runner_url: Callable[[str, DockerEngine], Awaitable[str]],
    image_on: Callable[[DockerEngine, bool], Awaitable[str]] | None,
    deployment: str,
    dispatcher_id: str,
) -> None:
    """Say once, at a dispatcher's start, for each host whose containers cannot reach NATS
    at the URL they get (checked from a container with ``image_on``'s image, else quickly
    from this machine)."""
    for host in fleet.hosts():
        try:
            engine = await fleet.engine(host)
            url = await runner_url(host.name, engine)
            image = None if image_on is None else await image_on(engine, False)
            found = await problem(engine, url, image=image, deployment=deployment)
            if found:
                log.warning("dispatcher %s: %s", dispatcher_id, found)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run decides nothing
            log.info("reachability check of %s skipped: %s", host.name, exc)
