"""A ``ktrdr-run dispatcher`` process for benchmarks, and what is read of it from the
outside: its memory and CPU time (``/proc``), and when it answers.

Nothing here imports docker: ``bench/queue.py`` imports this module while it may itself
stand in for the standard library's ``queue`` (see there).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors

from runner.protocol import DISPATCHER_PING_SUBJECT

if TYPE_CHECKING:
    from dispatcher.config import Config

KTRDR_RUN = str(Path(sys.executable).parent / "ktrdr-run")


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} for process {pid}")


def write_config(config: Config, path: Path) -> Path:
    """``config`` as the TOML file ``ktrdr-run`` reads."""
    from dispatcher.config import config_toml  # here: it imports docker (see the module's note)

    path.write_bytes(config_toml(config))
    return path


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DispatcherProcess:
    """``ktrdr-run -v dispatcher`` in a session of its own (a Ctrl-C at the terminal is the
    bench's to handle: it stops the dispatcher itself), with its config file and log."""

    def __init__(self, config: Config, workdir: Path, name: str) -> None:
        self.dispatcher_id = config.dispatcher.dispatcher_id
        self.config_path = write_config(config, workdir / f"{name}.toml")
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KTRDR_RUN_CONFIG": str(self.config_path)}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [KTRDR_RUN, "-v", "dispatcher"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (it finishes its running ops first), SIGKILL after ``timeout_s``; the
        exit code (None when it had to be killed or never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(line for line in text.splitlines() if "heartbeat" not in line)[-chars:]


async def wait_ready(nc: Any, process: DispatcherProcess, timeout_s: float = 300.0) -> None:
    """Until the dispatcher answers a ping (each try waits for its answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.alive():
            raise SystemExit(f"the dispatcher exited at start:\n{process.log_tail()}")
        try:
            await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=1.0)
            return
        except nats.errors.TimeoutError:
            pass
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.2)  # nobody listens yet: the answer is immediate, so pace it
        if time.monotonic() > deadline:
            raise SystemExit(f"the dispatcher did not answer within {timeout_s:g}s:\n{process.log_tail()}")
