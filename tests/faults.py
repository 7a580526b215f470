"""Fault-injection harness: dispatchers as real processes, faults injected for real, and
the invariants every fault scenario must keep.

Dispatchers run as ``ktrdr-run dispatcher`` OS processes (never coroutines sharing one
event loop), against a real nats-server and real dockerd. Faults are the real thing:
SIGKILL, SIGSTOP/SIGCONT of a dispatcher or of a dockerd, SIGKILL of nats-server.

After every scenario :func:`assert_exactly_once` checks, for each op: one terminal state in
its record and exactly one terminal ``status`` event in the event stream, at most one
container created per attempt (the engines' own event logs), no container left, and no
reservation left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
from nats.js import api

from dispatcher.config import Config
from dispatcher.kvwatch import current_entries
from runner.protocol import LABEL_OP_ID, TERMINAL_STATES
from tests.conftest import KTRDR_RUN, SESSION_TAG, creations, write_config

REPO = Path(__file__).resolve().parent.parent

# Short clocks, so faults play out in seconds: a dispatcher is dead 3 s after its last
# lease renewal, a runner must say hello within 6 s, heartbeat silence counts after 8 s.
FAST = {
    "cancel_grace_s": 3.0,
    "heartbeat_s": 0.5,
    "heartbeat_timeout_s": 8.0,
    "runner_ready_s": 6.0,
    "lease_s": 3.0,
    "ack_wait_s": 5.0,
    "progress_record_interval_s": 0.5,
    "retry_backoff_s": 0.5,
}


def fault_config(config: Config, suffix: str, **changes: Any) -> Config:
    """``config`` with the FAST clocks and a dispatcher id of this test session."""
    dispatcher = msgspec.structs.replace(
        config.dispatcher, **{**FAST, "dispatcher_id": f"{SESSION_TAG}-{suffix}", **changes}
    )
    return msgspec.structs.replace(config, dispatcher=dispatcher)


class DispatcherProcess:
    """One ``ktrdr-run dispatcher`` process with its own config file and log."""

    def __init__(self, config: Config, workdir: Path, name: str, argv: list[str] | None = None) -> None:
        self.config = config
        self.name = name
        self.config_path = write_config(config, workdir / f"{name}.toml")
        self.log_path = workdir / f"{name}.log"
        self.argv = argv or [KTRDR_RUN, "-v", "dispatcher"]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dispatcher_id(self) -> str:
        return self.config.dispatcher.dispatcher_id

    def start(self) -> DispatcherProcess:
        env = {**os.environ, "KTRDR_RUN_CONFIG": str(self.config_path)}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9: no goodbye, no lease release."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait (a clean stop finishes running ops first)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # stuck: its tasks and threads go to its log (dispatcher/diagnostics.py) first
                for signum in (signal.SIGUSR1, signal.SIGUSR2):
                    with contextlib.suppress(ProcessLookupError):
                        self.process.send_signal(signum)
                    time.sleep(1.0)
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode or 0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in text if "heartbeat" not in line)[-6000:] if lines else ""

    def __enter__(self) -> DispatcherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_argv(module: str, *args: str) -> list[str]:
    """Run a test-side module with the project's interpreter."""
    return [sys.executable, "-m", module, *args]


async def publish_jobs(url: str, jobs: list[dict[str, Any]]) -> list[str]:
    """Publish raw JSON job messages as any NATS client would."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    for job in jobs:
        await js.publish(
            f"ktrdr.jobs.{job['kind']}", json.dumps(job).encode(), headers={"Nats-Msg-Id": job["job_id"]}
        )
    await nc.close()
    return [str(job["job_id"]) for job in jobs]


async def records(url: str, op_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The op records (raw JSON) of ``op_ids`` that exist now."""
    nc = await nats.connect(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        kv = await nc.jetstream().key_value("ktrdr_ops")
        for op_id in op_ids:
            with contextlib.suppress(Exception):
                out[op_id] = json.loads((await kv.get(op_id)).value)
    finally:
        await nc.close()
    return out


async def wait_states(
    url: str, op_ids: list[str], states: set[str] | frozenset[str], timeout_s: float, *, why: str = ""
) -> dict[str, dict[str, Any]]:
    """Wait (polling KV, bounded) until every op is in one of ``states``."""
    deadline = time.monotonic() + timeout_s
    while True:
        now_records = await records(url, op_ids)
        pending = [op for op in op_ids if now_records.get(op, {}).get("state") not in states]
        if not pending:
            return now_records
        if time.monotonic() > deadline:
            seen = {op: now_records.get(op, {}).get("state") for op in pending}
            raise AssertionError(f"ops not in {sorted(states)} within {timeout_s}s: {seen} {why}")
        await asyncio.sleep(0.2)


async def all_events(url: str, op_id: str) -> list[dict[str, Any]]:
    """Every event of an op in the event stream (as a plain NATS client reads them)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    out: list[dict[str, Any]] = []
    try:
        info = await js.stream_info("KTRDR_EVENTS", subjects_filter=f"ktrdr.ops.{op_id}.>")
        total = sum((info.state.subjects or {}).values())
        sub = await js.subscribe(
            f"ktrdr.ops.{op_id}.>", ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        while len(out) < total:
            msg = await sub.next_msg(timeout=10)
            out.append(json.loads(msg.data))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


def containers_by_attempt(client: docker.DockerClient, op_id: str, since: float) -> dict[str, int]:
    """How many containers the engine created for each attempt of ``op_id`` since ``since``
    (the engine's own event stream, recorded live)."""
    return creations(client).by_attempt(op_id, since)


async def reserved_ops(url: str) -> set[str]:
    """Every op id that holds a reservation on any host."""
    nc = await nats.connect(url)
    held: set[str] = set()
    try:
        kv = await nc.jetstream().key_value("ktrdr_reservations")
        with contextlib.suppress(Exception):
            for entry in await current_entries(kv):
                held |= set(json.loads(entry.value))
    finally:
        await nc.close()
    return held


async def assert_exactly_once(
    url: str, op_ids: list[str], clients: list[docker.DockerClient], since: float, *, settle_s: float = 15
) -> dict[str, dict[str, Any]]:
    """The invariants of every fault scenario (see the module docstring); returns the records."""
    final = await wait_states(url, op_ids, TERMINAL_STATES, timeout_s=5, why="(all must be terminal)")
    for op_id in op_ids:
        terminal = [
            e
            for e in await all_events(url, op_id)
            if e["event"] == "status" and e["state"] in TERMINAL_STATES
        ]
        assert len(terminal) == 1, (op_id, [e["state"] for e in terminal])
        assert terminal[0]["state"] == final[op_id]["state"], (op_id, terminal, final[op_id]["state"])
        for client in clients:
            per_attempt = containers_by_attempt(client, op_id, since)
            assert all(n <= 1 for n in per_attempt.values()), (op_id, per_attempt)
    # removal follows the recorded outcome; a host that was down is reaped when it answers
    deadline = time.monotonic() + settle_s
    while True:
        left = [
            (c["Names"], c["State"])
            for client in clients
            for c in client.api.containers(all=True, filters={"label": LABEL_OP_ID})
            if (c.get("Labels") or {}).get(LABEL_OP_ID) in op_ids
        ]
        held = await reserved_ops(url) & set(op_ids)
        if not left and not held:
            return final
        assert time.monotonic() < deadline, f"left behind: containers {left}, reservations {held}"
        await asyncio.sleep(0.3)
