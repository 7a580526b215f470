"""Docker engine discovery against two real engines: the default one and a second dockerd
reached over TCP with TLS client certificates (see tests/second_dockerd.py)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.types
import msgspec
import nats
import pytest
from nats.js import api

from discovery.base import DiscoveryError
from discovery.config import EngineConfig
from discovery.docker_engines import (
    DockerEngineProvider,
    EngineEndpoint,
    LocalEngineProvider,
    connect_engine,
    connect_host,
)
from discovery.gpu import device_requests, gpu_device_ids, is_no_gpu_runtime_error
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import (
    RUNNER_NETWORK,
    RUNNER_USER,
    DockerEngine,
    ensure_runner_network,
    hardened_host_config,
)
from dispatcher.jetstream import JetStreamHandles
from runner.protocol import SPEC_ENV, Resources, RunnerSpec
from tests.second_dockerd import SecondDockerd, second_dockerd_fixture  # noqa: F401 - fixture

pytestmark = [pytest.mark.docker]
TEST_LABEL = {"ktrdr.test": "1"}


def engine2_config(engine: SecondDockerd, **overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "name": "engine2",
        "url": engine.tcp_url,
        "tls_ca": str(engine.ca),
        "tls_cert": str(engine.client_cert),
        "tls_key": str(engine.client_key),
        "timeout_s": 5.0,
        "max_ops": 3,
        "gpus": [{"index": 0, "model": "T4", "memory_gb": 16}],
    }
    values.update(overrides)
    return msgspec.convert(values, EngineConfig)


def mem_total_bytes() -> int:
    """MemTotal from /proc/meminfo: what a dockerd on this machine must report."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_provider_over_tcp_tls_reports_the_second_engines_capacity(second_dockerd: SecondDockerd) -> None:
    provider = DockerEngineProvider([engine2_config(second_dockerd)])
    (host,) = provider.discover()
    assert provider.errors == {}
    assert host.name == "engine2" and host.source == "docker"
    assert host.docker_url == second_dockerd.tcp_url
    assert host.cpus == float(os.cpu_count() or 0)
    assert host.memory_bytes == mem_total_bytes()
    assert host.gpu_runtime is False  # no nvidia runtime registered in this engine
    assert [g.model for g in host.gpus] == ["T4"]  # configured: engines do not list GPUs
    assert host.labels["max_ops"] == "3"

    # The host carries how to reach it: the dispatcher's client goes to the second engine.
    client = connect_host(host)
    try:
        info = client.info()
        assert info["DockerRootDir"] == str(second_dockerd.data_root)
        assert second_dockerd.image in {t for i in client.images.list() for t in i.tags}
    finally:
        client.close()
    assert (
        EngineEndpoint.of(host).describe() == f"{second_dockerd.tcp_url} (TLS client certificate, verified)"
    )


def test_wrong_client_certificate_is_a_clear_error(second_dockerd: SecondDockerd) -> None:
    bad = engine2_config(
        second_dockerd, tls_cert=str(second_dockerd.rogue_cert), tls_key=str(second_dockerd.rogue_key)
    )
    with pytest.raises(DiscoveryError) as info:
        DockerEngineProvider([bad]).describe(bad)
    message = str(info.value)
    assert message.startswith("engine engine2:")
    assert f"the engine at {second_dockerd.tcp_url} rejected our client certificate" in message
    assert str(second_dockerd.rogue_cert) in message and "--tlscacert" in message

    # discover() still lists it, with no capacity and the error, so health marks it unhealthy.
    provider = DockerEngineProvider([bad])
    (host,) = provider.discover()
    assert host.cpus == 0 and host.memory_bytes == 0
    assert "rejected our client certificate" in provider.errors["engine2"]


def test_untrusted_engine_certificate_and_missing_files_are_clear_errors(
    second_dockerd: SecondDockerd,
) -> None:
    with pytest.raises(DiscoveryError, match=r"the engine's TLS certificate at .* is not trusted"):
        connect_engine(
            second_dockerd.tcp_url,
            tls_ca=str(second_dockerd.rogue_ca),
            tls_cert=str(second_dockerd.client_cert),
            tls_key=str(second_dockerd.client_key),
            name="engine2",
        )
    with pytest.raises(DiscoveryError, match=r"tls_key file /nonexistent/key\.pem does not exist"):
        connect_engine(
            second_dockerd.tcp_url,
            tls_ca=str(second_dockerd.ca),
            tls_cert=str(second_dockerd.client_cert),
            tls_key="/nonexistent/key.pem",
        )
    # Plain HTTP to the TLS port.
    with pytest.raises(DiscoveryError, match="expects TLS"):
        connect_engine(second_dockerd.tcp_url, tls_verify=False, timeout_s=3)


def test_unreachable_engines_say_what_to_do(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(
        DiscoveryError, match=rf"nothing listens at tcp://127.0.0.1:{port}: is dockerd running"
    ):
        connect_engine(f"tcp://127.0.0.1:{port}", tls_verify=False, timeout_s=2)
    with pytest.raises(
        DiscoveryError, match=r"no Docker socket at unix:///.*/none\.sock: is dockerd running"
    ):
        connect_engine(f"unix://{tmp_path}/none.sock")
    with pytest.raises(DiscoveryError, match=rf"ssh to ssh://ktrdr@127.0.0.1:{port} failed"):
        connect_engine(f"ssh://ktrdr@127.0.0.1:{port}", timeout_s=2, name="ssh-host")


def test_two_engines_side_by_side(docker_client: docker.DockerClient, second_dockerd: SecondDockerd) -> None:
    """The local provider and the configured one see two different engines."""
    (local,) = LocalEngineProvider("").discover()
    (remote,) = DockerEngineProvider([engine2_config(second_dockerd)]).discover()
    assert local.labels["local"] == "1" and "local" not in remote.labels
    local_root = docker_client.info()["DockerRootDir"]
    client = connect_host(remote)
    try:
        assert client.info()["DockerRootDir"] != local_root
    finally:
        client.close()


def run_hardened(
    client: docker.DockerClient, image: str, command: list[str], env: dict[str, str], timeout_s: float = 120
) -> tuple[int, str]:
    """Create, start, wait, read logs, remove: one hardened container, as the dispatcher does."""
    api_client = client.api
    ensure_runner_network(api_client, "test")
    host_config = hardened_host_config(
        api_client, Resources(cpus=0.5, memory_gb=0.25), pids_limit=128, scratch_mb=64
    )
    created = api_client.create_container(
        image,
        command=command,
        user=RUNNER_USER,
        environment={"HOME": "/tmp", **env},
        labels={**TEST_LABEL, "ktrdr.test.id": uuid.uuid4().hex[:8]},
        host_config=host_config,
        working_dir="/tmp",
    )
    cid = created["Id"]
    try:
        api_client.start(cid)
        code = int(api_client.wait(cid, timeout=timeout_s)["StatusCode"])
        logs = api_client.logs(cid, stdout=True, stderr=True).decode(errors="replace")
        return code, logs
    finally:
        api_client.remove_container(cid, force=True)


def test_hardened_probe_container_on_the_second_engine(second_dockerd: SecondDockerd) -> None:
    client = connect_engine(
        second_dockerd.tcp_url,
        tls_ca=str(second_dockerd.ca),
        tls_cert=str(second_dockerd.client_cert),
        tls_key=str(second_dockerd.client_key),
    )
    try:
        code, logs = run_hardened(client, second_dockerd.image, ["--stdout", "probe"], {})
        assert code == 0, logs
        report = json.loads(logs.strip().splitlines()[-1])
        assert report["uid"] == 65534 and report["read_only_root"] is True
        assert report["no_capabilities"] is True and report["no_new_privileges"] is True
        assert report["memory_limit_bytes"] == int(0.25 * 1024**3)
        assert report["cpu_quota"] == pytest.approx(0.5)
        assert report["pids_limit"] == 128
        assert not client.containers.list(all=True, filters={"label": "ktrdr.test=1"})
    finally:
        client.close()


async def test_runner_on_the_second_engine_reaches_nats_on_the_host(
    second_dockerd: SecondDockerd, nats_server: EmbeddedNats, js_handles: JetStreamHandles
) -> None:
    """A runner container on the second engine reports its result over JetStream to the
    nats-server on this host, at the address the engine's bridge network gives."""
    client = connect_engine(
        second_dockerd.tcp_url,
        tls_ca=str(second_dockerd.ca),
        tls_cert=str(second_dockerd.client_cert),
        tls_key=str(second_dockerd.client_key),
    )
    engine = DockerEngine(client, name="engine2", workers=2)
    try:
        nats_url = await asyncio.to_thread(engine.runner_nats_url, nats_server.url)
        # the gateway of the runners' own network on that engine, read back from the engine
        network = client.api.inspect_network(RUNNER_NETWORK)
        gateway = network["IPAM"]["Config"][0]["Gateway"]
        assert nats_url == f"nats://{gateway}:{nats_server.port}"
        op_id = f"e2-{uuid.uuid4().hex[:10]}"
        spec = RunnerSpec(op_id=op_id, kind="probe", params={"hold_s": 0.5, "tick_s": 0.1}, nats_url=nats_url)
        code, logs = await asyncio.to_thread(
            run_hardened, client, second_dockerd.image, [], {SPEC_ENV: msgspec.json.encode(spec).decode()}
        )
        assert code == 0, logs
        events = await read_events(nats_server.url, op_id)
        kinds = [e["event"] for e in events]
        assert "progress" in kinds and kinds[-1] == "result", kinds
        assert events[-1]["result"]["uid"] == 65534
    finally:
        engine.close()


async def read_events(url: str, op_id: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """An op's events from the start, as a plain NATS client reads them, up to its result."""
    nc = await nats.connect(url)
    events: list[dict[str, Any]] = []
    try:
        sub = await nc.jetstream().subscribe(
            f"ktrdr.ops.{op_id}.>", ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=deadline - time.monotonic())
            except TimeoutError:
                break
            event = json.loads(msg.data)
            if event["event"] == "heartbeat":
                continue
            events.append(event)
            if event["event"] in ("result", "error"):
                break
    finally:
        await nc.close()
    return events


def test_gpu_device_requests_payload() -> None:
    (by_count,) = device_requests(None, 2)
    assert by_count == {"Driver": "", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    (by_ids,) = device_requests(["1", "GPU-8f2c"], 2)
    assert by_ids["DeviceIDs"] == ["1", "GPU-8f2c"] and by_ids["Count"] == 0
    assert by_ids["Capabilities"] == [["gpu"]]
    assert device_requests(None, -1)[0]["Count"] == -1
    assert device_requests([], 0) == []
    from discovery.base import Gpu

    assert gpu_device_ids([Gpu(0), Gpu(1, device_id="GPU-abc")]) == ["0", "GPU-abc"]


def test_no_gpu_runtime_error_is_recognised_from_a_real_engine(second_dockerd: SecondDockerd) -> None:
    """Asking a real engine without a GPU runtime for GPUs fails at start with the message
    we recognise (create succeeds, start fails)."""
    client = second_dockerd.client()
    api_client = client.api
    host_config = api_client.create_host_config(device_requests=device_requests(None, 1))
    created = api_client.create_container(
        second_dockerd.image, command=["--stdout", "probe"], labels=TEST_LABEL, host_config=host_config
    )
    try:
        with pytest.raises(docker.errors.APIError) as info:
            api_client.start(created["Id"])
        assert is_no_gpu_runtime_error(info.value), str(info.value)
        assert is_no_gpu_runtime_error(str(info.value))
        assert not is_no_gpu_runtime_error("no such image")
    finally:
        api_client.remove_container(created["Id"], force=True)
        client.close()
