"""Prometheus metrics (issue 14, started): after a known set of ops, /metrics counts
exactly them — scraped over HTTP from a dispatcher with ``[metrics] listen`` set, parsed
with prometheus_client's own text parser (an independent reading of what was served)."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.config import Config, MetricsConfig
from tests.conftest import RunningDispatcher
from tests.test_lifecycle import publish_job, wait_for_state

pytestmark = [pytest.mark.docker, pytest.mark.nats]


@pytest.fixture
def config(config: Config) -> Config:
    return msgspec.structs.replace(config, metrics=MetricsConfig(listen="127.0.0.1:0"))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_the_ops_that_ran(config: Config, dispatcher: RunningDispatcher) -> None:
    url = config.nats.url
    jobs: list[dict[str, Any]] = [
        *({"job_id": f"m-ok-{uuid.uuid4().hex[:6]}", "kind": "probe"} for _ in range(3)),
        {"job_id": f"m-fail-{uuid.uuid4().hex[:6]}", "kind": "probe", "params": {"fail": True}},
        {"job_id": f"m-bad-{uuid.uuid4().hex[:6]}", "kind": "probe", "params": {"no_such": 1}},
    ]
    for job in jobs:
        await publish_job(url, job)
    records = [await wait_for_state(url, job["job_id"], {"completed", "failed"}, 90) for job in jobs]
    assert dispatcher.dispatcher.metrics.port, "the dispatcher serves no metrics"  # served from its start
    samples = await asyncio.to_thread(scrape, dispatcher.dispatcher.metrics.port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    reasons = [(r["state"], (r.get("error") or {}).get("reason", "")) for r in records]
    assert reasons[:3] == [("completed", "")] * 3 and reasons[4] == ("failed", "invalid_job"), reasons
    assert value("ktrdr_ops_submitted_total", kind="probe") == 4  # the invalid one never queued
    assert value("ktrdr_ops_finished_total", kind="probe", state="completed", reason="") == 3
    failed_reason = reasons[3][1]
    assert value("ktrdr_ops_finished_total", kind="probe", state="failed", reason=failed_reason) == 1
    assert value("ktrdr_ops_finished_total", kind="probe", state="failed", reason="invalid_job") == 1
    assert value("ktrdr_op_queue_wait_seconds_count", kind="probe") == 4
    assert value("ktrdr_op_start_seconds_count", kind="probe", phase="create") == 4
    assert value("ktrdr_op_start_seconds_count", kind="probe", phase="start") == 4
    assert value("ktrdr_op_run_seconds_count", kind="probe") == 4
    # no op ids or parameters among the labels
    assert not any("m-" in v for (_name, labels) in samples for _k, v in labels)


async def test_gauges_show_capacity_states_and_reconnects(
    config: Config, dispatcher: RunningDispatcher, nats_server: Any, docker_client: Any
) -> None:
    """Capacity per host and resource against docker's own figures, ops by state after a
    known set of ops, the runner-ready start phase, and one reconnect after the server
    restarts."""
    url = config.nats.url
    ids = [f"g-ok-{uuid.uuid4().hex[:6]}" for _ in range(2)] + [f"g-fail-{uuid.uuid4().hex[:6]}"]
    for op_id in ids:
        params = {"fail": True} if "fail" in op_id else {}
        await publish_job(url, {"job_id": op_id, "kind": "probe", "params": params})
    for op_id in ids:
        await wait_for_state(url, op_id, {"completed", "failed"}, 90)
    port = dispatcher.dispatcher.metrics.port
    info = await asyncio.to_thread(docker_client.info)
    host = dispatcher.dispatcher.fleet.hosts()[0].name

    def value(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), -1.0)

    deadline = asyncio.get_running_loop().time() + 30  # ops by state: counted by the periodic sweep
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if (
            value(samples, "ktrdr_ops", state="completed") == 2
            or asyncio.get_running_loop().time() > deadline
        ):
            break
        await asyncio.sleep(0.5)
    assert value(samples, "ktrdr_ops", state="completed") == 2
    assert value(samples, "ktrdr_ops", state="failed") == 1
    assert value(samples, "ktrdr_ops", state="running") == 0
    assert value(samples, "ktrdr_capacity_total", host=host, resource="cpus") == float(info["NCPU"])
    assert value(samples, "ktrdr_capacity_total", host=host, resource="memory_bytes") == float(
        info["MemTotal"]
    )
    assert value(samples, "ktrdr_capacity_free", host=host, resource="cpus") == float(
        info["NCPU"]
    )  # none running
    assert value(samples, "ktrdr_capacity_total", host=host, resource="gpus") == 0
    assert value(samples, "ktrdr_op_start_seconds_count", kind="probe", phase="runner_ready") == 3
    assert value(samples, "ktrdr_nats_reconnects_total") == 0

    await asyncio.to_thread(nats_server.stop)
    await nats_server.start()
    nc = dispatcher.dispatcher.nc
    deadline = asyncio.get_running_loop().time() + 30
    while not (nc.is_connected and nc.stats["reconnects"] >= 1):
        assert asyncio.get_running_loop().time() < deadline, "the dispatcher did not reconnect"
        await asyncio.sleep(0.2)
    samples = await asyncio.to_thread(scrape, port)
    assert value(samples, "ktrdr_nats_reconnects_total") == 1
