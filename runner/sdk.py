"""The SDK an operation uses: progress, logs, a cancel token, artifacts.

An operation is ``fn(ctx: OpContext, params) -> dict``. It runs on a compute thread; every
SDK call here is safe from that thread and, except ``artifact``, never blocks it:
progress is a latest-value slot the transport publishes at its own pace (throttled),
logs go into a bounded queue.

Where the op runs decides the transport (the :class:`Sink`): inside a container it is
JetStream (``runner.transport``); in tests and ``python -m runner --stdout`` it is a
:class:`LocalSink` that keeps everything in memory.
"""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runner.errors import Cancelled, KtrdrRunnerError
from runner.protocol import ProgressSnapshot, now

if TYPE_CHECKING:
    from runner.isolation import Checks


def artifact_name(data: bytes) -> str:
    """The object-store name of an artifact: the sha256 of its content."""
    return "sha256-" + hashlib.sha256(data).hexdigest()


class Sink(Protocol):
    """Where an op's reports go."""

    def progress(self, snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        """Offer the latest progress; must not block. A milestone is published for sure
        (in order); other progress may be superseded by newer progress."""

    def log(self, level: str, message: str) -> None:
        """Queue one log line; must not block."""

    def artifact(self, name: str, object_name: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``object_name``; may block until stored."""

    def fetch(self, object_name: str) -> bytes:
        """The bytes of a stored artifact; may block. KtrdrRunnerError when missing."""

    def check_isolation(self) -> Checks:
        """What this op's container can do to others (``runner.isolation``): check name
        -> (denied | allowed | unknown, one sentence); blocks up to about 10 s."""


class CancelToken:
    """Trips once; checked by the op at its checkpoints."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "") -> None:
        """Ask the op to stop at its next checkpoint."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether a cancel was requested."""
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True as soon as a cancel is requested."""
        return self._event.wait(timeout_s)


class OpContext:
    """Handed to every operation."""

    def __init__(
        self,
        *,
        op_id: str,
        kind: str,
        sink: Sink,
        attempt: int = 1,
        cancel_token: CancelToken | None = None,
        scratch_dir: Path = Path("/tmp"),
        data_dir: Path | None = None,
    ) -> None:
        self.op_id = op_id
        self.kind = kind
        self.attempt = attempt
        self.scratch_dir = scratch_dir
        self.data_dir = data_dir
        self.cancel_token = cancel_token or CancelToken()
        self.artifacts: dict[str, str] = {}
        self.partial_saved = False
        self._sink = sink

    def progress(self, percent: float, message: str = "", *, step: str = "", **metrics: float) -> None:
        """Report progress: ``percent`` in [0, 100], a message, numeric metrics (loss=0.3).
        Progress is throttled: when reports come faster than they are sent, the newest wins."""
        self._report(percent, message, step, metrics, milestone=False)

    def milestone(self, percent: float, message: str = "", *, step: str = "", **metrics: float) -> None:
        """Progress that is always published, in order (an epoch's end): a client sees
        every milestone as its own progress event."""
        self._report(percent, message, step, metrics, milestone=True)

    def _report(
        self, percent: float, message: str, step: str, metrics: dict[str, float], *, milestone: bool
    ) -> None:
        if not math.isfinite(percent):
            raise KtrdrRunnerError(f"progress percent must be a finite number, got {percent!r}")
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            number = float(value)
            if math.isfinite(number):
                clean[key] = number
        self._sink.progress(
            ProgressSnapshot(
                percent=min(100.0, max(0.0, float(percent))),
                step=step,
                message=message,
                metrics=clean,
                ts=now(),
            ),
            milestone,
        )

    def log(self, message: str, level: str = "info") -> None:
        """Send one log line to the op's log events."""
        self._sink.log(level, message)

    @property
    def cancelled(self) -> bool:
        """Whether the op has been asked to cancel."""
        return self.cancel_token.cancelled

    def checkpoint(self) -> None:
        """Raise :class:`Cancelled` if the op has been asked to cancel."""
        if self.cancel_token.cancelled:
            raise Cancelled(self.cancel_token.reason or "cancel requested")

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early and raising :class:`Cancelled` on a cancel request."""
        if self.cancel_token.wait(seconds):
            self.checkpoint()

    def artifact(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` in the artifact store; returns its content-addressed name.

        Identical content is stored once. The result event lists every artifact by
        ``name``.
        """
        object_name = artifact_name(data)
        self._sink.artifact(name, object_name, data, content_type)
        self.artifacts[name] = object_name
        return object_name

    def load_artifact(self, object_name: str) -> bytes:
        """A stored artifact's bytes by its store name (``sha256-...``), verified."""
        data = self._sink.fetch(object_name)
        if object_name.startswith("sha256-") and artifact_name(data) != object_name:
            raise KtrdrRunnerError(
                f"artifact {object_name} is corrupt: its content hashes to {artifact_name(data)}"
            )
        return data

    def check_isolation(self) -> dict[str, dict[str, str]]:
        """Try what this op's container must not be able to do (another op's subjects, a
        job, an op record, another container): ``{"isolation": check -> "denied" |
        "allowed" | "unknown", "isolation_notes": check -> what was tried and seen}``.
        Blocks up to about 10 s; changes nothing even where a check is allowed."""
        from runner.isolation import as_report

        return as_report(self._sink.check_isolation())


class LocalSink:
    """A sink that keeps everything in memory: tests and ``--stdout`` mode."""

    def __init__(self) -> None:
        self.progress_reports: list[ProgressSnapshot] = []
        self.logs: list[tuple[str, str]] = []
        self.stored: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def progress(self, snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        with self._lock:
            self.progress_reports.append(snapshot)

    def log(self, level: str, message: str) -> None:
        with self._lock:
            self.logs.append((level, message))

    def artifact(self, name: str, object_name: str, data: bytes, content_type: str) -> None:
        with self._lock:
            self.stored[object_name] = data

    def fetch(self, object_name: str) -> bytes:
        with self._lock:
            if object_name not in self.stored:
                raise KtrdrRunnerError(f"no artifact {object_name!r} in the artifact store")
            return self.stored[object_name]

    def check_isolation(self) -> Checks:
        # no NATS here: only the network check runs for real
        from runner.isolation import check_isolation_here

        return check_isolation_here()


def local_context(kind: str, op_id: str = "local", **kwargs: object) -> tuple[OpContext, LocalSink]:
    """An OpContext backed by a LocalSink, for tests and local runs."""
    sink = LocalSink()
    ctx = OpContext(op_id=op_id, kind=kind, sink=sink, **kwargs)  # type: ignore[arg-type]
    return ctx, sink
