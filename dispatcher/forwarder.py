"""Let containers reach a server that listens on loopback only.

The embedded nats-server listens on ``127.0.0.1`` (nats-server listens on one address,
and ``0.0.0.0`` would put it on the LAN). Containers cannot reach loopback, so a process
that runs a dispatcher against it forwards one more address (the runners' network
gateway of this machine's engine, on the same port) to it, byte for byte. The server
still authenticates every client: the forwarder only carries bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

log = logging.getLogger("ktrdr.forwarder")

CHUNK = 65536


class Forwarder:
    """Answers on extra addresses of this machine for ``127.0.0.1:<port>``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._servers: dict[str, asyncio.Server] = {}
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[str]:
        """Where it answers now."""
        return list(self._servers)

    async def expose(self, host: str) -> None:
        """Answer on ``host`` too (an address of this machine, e.g. a Docker bridge
        gateway). Loopback, not an address here, or the port already taken there (another
        command forwards it): nothing to do."""
        if not host or host in self._servers:
            return
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
        if address.is_loopback or address.is_unspecified:
            return
        try:
            self._servers[host] = await asyncio.start_server(self._accept, host, self.port)
        except OSError as exc:
            log.info("not forwarding %s:%d to the local NATS server: %s", host, self.port, exc)
            return
        log.info("local NATS server also answers on %s:%d (for containers)", host, self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), timeout=5
                )
            except (OSError, TimeoutError):
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            if task is not None:
                self._pipes.discard(task)

    async def close(self) -> None:
        """Stop answering, and end the connections it carries."""
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for server in servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(CHUNK):
            sink.write(chunk)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.close()
