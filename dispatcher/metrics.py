"""Prometheus metrics of one dispatcher (``[metrics] listen``).

Counts come from the op records this dispatcher writes: every compare-and-set write that
changes an op's state succeeds exactly once across all dispatchers, so summing a counter
over dispatchers counts each op once. Labels are kinds, states and reasons, never op ids
or parameters (their number is bounded by the registry and the contract).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.placement import Capacity
from runner.protocol import ALL_STATES, TERMINAL_STATES, OpRecord

log = logging.getLogger("ktrdr.metrics")

#: Seconds: from well under a container start to a long training run.
DURATION_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14_400)


@dataclass(frozen=True, slots=True)
class LiveSources:
    """Where the gauges read the dispatcher's state at scrape time."""

    capacity: Callable[[], list[Capacity]]
    pool_sizes: Callable[[], dict[tuple[str, str], int]]
    reconnects: Callable[[], int]


class _LiveCollector(Collector):
    """Gauges computed when scraped (capacity, warm pool, reconnects): nothing to keep
    in step between scrapes."""

    def __init__(self, sources: LiveSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        total = GaugeMetricFamily("ktrdr_capacity_total", "What a host has", labels=["host", "resource"])
        free = GaugeMetricFamily(
            "ktrdr_capacity_free", "What reservations leave free on a host", labels=["host", "resource"]
        )
        for item in self._sources.capacity():
            total.add_metric([item.host, item.resource], item.total)
            free.add_metric([item.host, item.resource], item.free)
        pool = GaugeMetricFamily(
            "ktrdr_pool_containers", "Warm pool containers by shape and state", labels=["shape", "state"]
        )
        for (shape, state), count in sorted(self._sources.pool_sizes().items()):
            pool.add_metric([shape, state], count)
        reconnects = CounterMetricFamily(
            "ktrdr_nats_reconnects", "Times this dispatcher's NATS connection was re-established"
        )
        reconnects.add_metric([], self._sources.reconnects())
        yield from (total, free, pool, reconnects)


class Metrics:
    """The dispatcher's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: Where :meth:`serve` listens (0 until it does).
        self.port = 0
        self.submitted = Counter(
            "ktrdr_ops_submitted", "Ops accepted into the queue", ["kind"], registry=self.registry
        )
        self.finished = Counter(
            "ktrdr_ops_finished",
            "Ops that reached a terminal state",
            ["kind", "state", "reason"],
            registry=self.registry,
        )
        self.requeued = Counter(
            "ktrdr_ops_requeued",
            "Ended ops an operator requeued (ktrdr-run ops requeue), by the state they left",
            ["kind", "from_state"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ktrdr_op_queue_wait_seconds",
            "From queued to placed",
            ["kind"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.start_phase = Histogram(
            "ktrdr_op_start_seconds",
            "Start phases: create (placed to created), start (created to running) and "
            "runner_ready (running to the runner's first word)",
            ["kind", "phase"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "ktrdr_op_run_seconds",
            "From running to a terminal state",
            ["kind"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )

        self.ops = Gauge(
            "ktrdr_ops",
            "Op records by state (the whole deployment's, as of this dispatcher's last sweep)",
            ["state"],
            registry=self.registry,
        )

    def watch(self, sources: LiveSources) -> None:
        """Serve the gauges read from the dispatcher's live state."""
        self.registry.register(_LiveCollector(sources))

    def count_states(self, counts: dict[str, int]) -> None:
        """Set the ops-by-state gauge from a full count (states missing count 0)."""
        for state in {*ALL_STATES, *counts}:
            self.ops.labels(state).set(counts.get(state, 0))

    def runner_ready(self, kind: str, seconds: float) -> None:
        """The runner of an op of ``kind`` was first heard ``seconds`` after it ran."""
        self.start_phase.labels(kind, "runner_ready").observe(max(0.0, seconds))

    def observe(self, before: OpRecord | None, after: OpRecord) -> None:
        """One successful write of an op record (``before`` None: it was created)."""
        if before is not None and before.state == after.state:
            return
        kind, stamps = after.kind, after.timestamps
        if before is None and after.state == "queued":
            self.submitted.labels(kind).inc()
        elif before is not None and before.terminal and after.state == "queued":
            self.requeued.labels(kind, before.state).inc()
        elif after.state == "placing" and "queued" in stamps:
            self.queue_wait.labels(kind).observe(max(0.0, stamps["placing"] - stamps["queued"]))
        elif after.state == "starting" and "placing" in stamps:
            self.start_phase.labels(kind, "create").observe(max(0.0, stamps["starting"] - stamps["placing"]))
        elif after.state == "running" and "starting" in stamps:
            self.start_phase.labels(kind, "start").observe(max(0.0, stamps["running"] - stamps["starting"]))
        if after.state in TERMINAL_STATES:
            reason = after.error.reason if after.error is not None else ""
            self.finished.labels(kind, after.state, reason).inc()
            if "running" in stamps and after.state in stamps:
                self.run_time.labels(kind).observe(max(0.0, stamps[after.state] - stamps["running"]))

    def serve(self, listen: str) -> Callable[[], None]:
        """Serve ``/metrics`` on ``listen`` (``host:port``; port 0 picks one, see
        :attr:`port`); returns what stops it."""
        host, _, port = listen.rpartition(":")
        server, thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self.port = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return stop
