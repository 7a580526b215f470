"""Placement constraints on real engines (issue 15): the local dockerd, a second one over
TLS labelled `pool=b` in the config, and static GPU host entries (GPUs cannot run here:
a job asking more GPU memory than any has fails before any container)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from discovery.config import DiscoveryConfig, EngineConfig, GpuSpec, StaticGpuHost
from dispatcher.config import Config
from runner.protocol import TERMINAL_STATES
from tests.second_dockerd import (
    SecondDockerd,
    second_dockerd_fixture,  # noqa: F401 - the fixture
)
from tests.test_lifecycle import publish_job, wait_for_state
from tests.test_placement_engines import new_id, start, wait_hosts, with_discovery

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def engines(second: SecondDockerd, *, max_ops: int = 0) -> DiscoveryConfig:
    tls = {"tls_ca": str(second.ca), "tls_cert": str(second.client_cert), "tls_key": str(second.client_key)}
    return DiscoveryConfig(
        engines=[
            EngineConfig(name="engine-b", url=second.tcp_url, labels={"pool": "b"}, max_ops=max_ops, **tls)
        ],
        gpu_hosts=[
            StaticGpuHost(
                name="gpu-small", url=second.tcp_url, gpus=[GpuSpec(index=0, model="T4", memory_gb=16)], **tls
            ),
        ],
        health_interval_s=1.0,
    )


async def test_constraints_place_ops_only_where_allowed(
    config: Config, runner_image: str, second_dockerd: SecondDockerd, no_leftover_containers: None
) -> None:
    cfg = with_discovery(config, engines(second_dockerd), "constraints")
    url = cfg.nats.url
    async with start(cfg, runner_image) as (_service, fleet):
        await wait_hosts(fleet, 3)
        local = next(h.name for h in fleet.hosts() if h.name not in ("engine-b", "gpu-small"))

        started = time.monotonic()
        big = await publish_job(
            url,
            {
                "job_id": new_id("vram"),
                "kind": "probe",
                "resources": {"gpu": "required", "gpu_memory_gb": 24},
            },
        )
        failed = await wait_for_state(url, big, TERMINAL_STATES, 30)
        assert time.monotonic() - started < 5  # at once, not a wait
        assert failed["state"] == "failed" and failed["error"]["reason"] == "invalid_job"
        message = failed["error"]["message"]
        assert "gpu-small: GPU memory 16 GB; resources.gpu_memory_gb wants 24 GB" in message, message
        assert f"{local}: no GPU" in message and "engine-b: no GPU" in message, message
        assert not failed.get("container_id")

        cases: list[tuple[dict[str, Any], set[str]]] = [
            ({"host_labels": {"pool": "b"}}, {"engine-b"}),
            ({"hosts": [local]}, {local}),
            ({"avoid_hosts": ["engine-b", "gpu-small"]}, {local}),
        ]
        for constraint, allowed in cases:
            ids = [new_id("c") for _ in range(3)]
            for op_id in ids:
                await publish_job(
                    url, {"job_id": op_id, "kind": "probe", "resources": {"cpus": 0.25, **constraint}}
                )
            records = [await wait_for_state(url, op_id, TERMINAL_STATES, 60) for op_id in ids]
            assert {r["state"] for r in records} == {"completed"}, [r.get("error") for r in records]
            assert {r["host"] for r in records} <= allowed, (constraint, [r["host"] for r in records])
            assert records[0]["resources"] | constraint == records[0]["resources"]  # kept in the record


async def test_an_op_allowed_only_on_a_busy_host_waits_then_runs_there(
    config: Config, runner_image: str, second_dockerd: SecondDockerd, no_leftover_containers: None
) -> None:
    cfg = with_discovery(config, engines(second_dockerd, max_ops=1), "busy")
    url = cfg.nats.url
    async with start(cfg, runner_image) as (_service, fleet):
        await wait_hosts(fleet, 3)
        holder = await publish_job(
            url,
            {
                "job_id": new_id("hold"),
                "kind": "probe",
                "params": {"hold_s": 4},
                "resources": {"hosts": ["engine-b"]},
            },
        )
        await wait_for_state(url, holder, {"running"}, 60)
        waiter = await publish_job(
            url, {"job_id": new_id("wait"), "kind": "probe", "resources": {"hosts": ["engine-b"]}}
        )
        queued = await wait_for_state(url, waiter, {"queued", "placing", "running", "completed"}, 30)
        assert queued["state"] == "queued"  # the local engine is free, but not allowed
        first = await wait_for_state(url, holder, TERMINAL_STATES, 60)
        second = await wait_for_state(url, waiter, TERMINAL_STATES, 60)
        assert first["state"] == second["state"] == "completed"
        assert second["host"] == "engine-b"
        assert second["timestamps"]["running"] >= first["timestamps"][first["state"]] - 0.5
