"""A sweep whose dispatcher is killed (kill -9, a real process) mid-sweep: another
dispatcher process takes the sweep over and finishes it from the stored child results,
without running a finished chunk again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import docker
import pytest

from dispatcher.config import Config
from dispatcher.jetstream import JetStreamHandles
from dispatcher.sweep_children import chunk_range
from tests.conftest import creations
from tests.faults import DispatcherProcess, fault_config, publish_jobs, records, wait_states

pytestmark = [pytest.mark.docker, pytest.mark.nats]

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


@pytest.mark.parametrize("after", ["restarted", "replaced", "stopped"])
async def test_a_sweep_whose_dispatcher_dies_is_finished_without_rerunning_chunks(
    after: str,
    config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    js_handles: JetStreamHandles,
    no_leftover_containers: None,
) -> None:
    url = config.nats.url
    since = time.time()
    first = DispatcherProcess(fault_config(config, "sweep-first"), tmp_state, "sweep-first").start()
    # kill -9, then the same dispatcher started again (same id) or another one taking the
    # sweep over; or a clean stop (SIGTERM), which must not wait for the sweep to end
    second_id = "sweep-second" if after == "replaced" else "sweep-first"
    second = DispatcherProcess(fault_config(config, second_id), tmp_state, f"sweep-{after}")
    space = {
        "fast": {"type": "range", "start": 2, "stop": 42},
        "slow": {"type": "range", "start": 50, "stop": 66},
    }
    sweep_id = f"sweep-kill-{after}-{int(since)}"
    params = {"strategy": "sma_cross", "symbol": "DEMO", "space": space, "chunk_size": 40}
    try:
        await publish_jobs(url, [{"job_id": sweep_id, "kind": "sweep", "params": params}])
        # wait until two chunks have finished, then kill the sweep's dispatcher outright
        deadline = time.monotonic() + 180
        while True:
            parent = (await records(url, [sweep_id])).get(sweep_id, {})
            children = await records(url, parent.get("children", []))
            finished = {c: r for c, r in children.items() if r["state"] == "completed"}
            if len(finished) >= 2:
                break
            assert time.monotonic() < deadline, (parent.get("state"), first.log_tail())
            await asyncio.sleep(0.1)
        if after == "stopped":
            stopping = time.monotonic()
            assert first.stop(timeout_s=60) == 0, first.log_tail()
            assert time.monotonic() - stopping < 30, "a clean stop waited for the sweep"
            assert "left for the next one to resume" in first.log_path.read_text(), first.log_tail()
        else:
            first.kill()
        assert parent["state"] == "running" and parent["dispatcher"] == first.dispatcher_id
        second.start()
        final = await wait_states(url, [sweep_id], TERMINAL, 240, why=second.log_tail())
    finally:
        first.kill()
        second.stop()
    record = final[sweep_id]
    assert record["state"] == "completed", (record.get("error"), second.log_tail())
    assert record["dispatcher"] == second.dispatcher_id
    result = record["result"]
    assert result["done"] == result["total"] == 640 and result["failed"] == 0
    assert len(record["children"]) == 16  # 640 in chunks of 40: none re-planned, none added

    spans = sorted(chunk_range(sweep_id, c) or (-1, 0) for c in record["children"])
    covered = [i for first_index, count in spans for i in range(first_index, first_index + count)]
    assert covered == list(range(640)), "each combination ran in exactly one chunk"

    # the sweep completes on its chunks' results; their containers exit just after
    ended = await wait_states(url, record["children"], {"completed"}, 60)
    for child_id, before in finished.items():
        # a finished chunk was read back, not run again: same record, one container ever
        assert ended[child_id]["timestamps"]["completed"] == before["timestamps"]["completed"]
        assert ended[child_id]["attempts"] == 1
        assert creations(docker_client).by_attempt(child_id, since) == {"1": 1}
    assert "resuming with" in second.log_path.read_text(), second.log_tail()
