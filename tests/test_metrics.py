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
