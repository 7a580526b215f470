"""Host health across failures against real engines (the local one, and sockets where no
engine answers), the inventory, and the ktrdr_hosts snapshot in a real nats-server."""

from __future__ import annotations

from pathlib import Path

import docker
import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from discovery.base import Gpu, Host
from discovery.config import StaticGpuHost
from discovery.docker_engines import EngineEndpoint
from discovery.health import (
    HostHealth,
    HostSnapshot,
    Inventory,
    kv_key,
    publish_snapshot,
    read_snapshot,
    snapshot_of,
)
from discovery.static import StaticGpuProvider
from dispatcher.jetstream import JetStreamHandles
from dispatcher.kvwatch import current_entries

pytestmark = [pytest.mark.docker]
LOCAL = "unix:///var/run/docker.sock"


def engine(name: str, url: str, *, cpus: float = 0.0, memory_bytes: int = 0, source: str = "test") -> Host:
    return Host(
        name=name,
        source=source,
        docker_url=url,
        cpus=cpus,
        memory_bytes=memory_bytes,
        labels=EngineEndpoint(url, timeout_s=3).labels(),
    )


class ListProvider:
    """A provider whose hosts the test sets (the hosts themselves are real engine URLs)."""

    def __init__(self, name: str, hosts: list[Host]) -> None:
        self.name = name
        self.hosts = hosts

    def discover(self) -> list[Host]:
        return list(self.hosts)


@pytest.fixture
def down_url(tmp_path: Path) -> str:
    return f"unix://{tmp_path}/no-engine.sock"


async def test_states_across_failures(docker_client: docker.DockerClient, down_url: str) -> None:
    health = HostHealth(failure_threshold=2, gone_after_checks=3)
    try:
        local = engine("local", LOCAL)
        assert await health.check(local) is True
        status = health.status("local")
        assert status is not None and status.state == "available" and status.failures == 0
        assert status.facts is not None and status.facts.cpus == docker_client.info()["NCPU"]

        # A host that has never answered is unhealthy at once.
        assert await health.check(engine("never", down_url)) is False
        never = health.status("never")
        assert never is not None and never.state == "unhealthy"
        assert "no Docker socket at" in never.error and "is dockerd running there?" in never.error

        # The same host name whose engine stops answering (its socket now leads nowhere):
        # still available below the threshold, unhealthy at it, gone after too many checks.
        flaky_down = engine("local", down_url)

        def state() -> tuple[str, int]:
            current = health.status("local")
            assert current is not None
            return current.state, current.failures

        assert await health.check(flaky_down) is False
        assert state() == ("available", 1)
        assert await health.check(flaky_down) is False
        assert state() == ("unhealthy", 2)
        # It answers again: available, failures reset.
        assert await health.check(local) is True
        assert state() == ("available", 0)

        for _ in range(2 + 3):
            await health.check(flaky_down)
        gone = health.status("local")
        assert gone is not None and gone.state == "gone"
        assert gone.gone_reason.startswith("unhealthy for 4 checks")
        assert health.forget_gone() == ["local"]
        assert health.status("local") is None
    finally:
        health.close()


async def test_inventory_rediscovers_checks_and_marks_gone(
    docker_client: docker.DockerClient, down_url: str
) -> None:
    provider = ListProvider(
        "list", [engine("local", LOCAL, cpus=1.5, memory_bytes=2**30), engine("down", down_url, cpus=4)]
    )
    static = StaticGpuProvider(
        [
            msgspec.convert(
                {"name": "gpu-box", "url": LOCAL, "gpus": [{"index": 0, "model": "A10"}]}, StaticGpuHost
            )
        ]
    )
    inventory = Inventory([provider, static], rediscover_s=3600, failure_threshold=2)
    try:
        statuses = {s.host.name: s for s in await inventory.refresh()}
        assert {n: s.state for n, s in statuses.items()} == {
            "local": "available",
            "down": "unhealthy",
            "gpu-box": "available",
        }
        available = {h.name: h for h in inventory.available()}
        assert sorted(available) == ["gpu-box", "local"]
        # The provider's capacity is kept; what the config left at 0 comes from the engine.
        assert available["local"].cpus == 1.5 and available["local"].memory_bytes == 2**30
        info = docker_client.info()
        assert (
            available["gpu-box"].cpus == info["NCPU"]
            and available["gpu-box"].memory_bytes == info["MemTotal"]
        )
        assert available["gpu-box"].gpus == (Gpu(index=0, model="A10"),)

        # No rediscovery until it is due: a host removed from the provider is still there.
        provider.hosts = provider.hosts[:1]
        await inventory.refresh()
        assert {s.host.name for s in inventory.hosts()} == {"local", "down", "gpu-box"}
        statuses = {s.host.name: s for s in await inventory.refresh(rediscover=True)}
        assert statuses["down"].state == "gone"
        assert statuses["down"].gone_reason == "no longer discovered by list"
        assert {s.host.name for s in inventory.hosts()} == {"local", "gpu-box"}
        # Reported once, then forgotten.
        assert "down" not in {s.host.name for s in await inventory.refresh()}
    finally:
        inventory.close()


async def test_a_failing_provider_keeps_its_hosts(down_url: str) -> None:
    class Failing(ListProvider):
        fail = False

        def discover(self) -> list[Host]:
            if self.fail:
                raise OSError("provider down")
            return super().discover()

    provider = Failing("flaky", [engine("local", LOCAL)])
    inventory = Inventory([provider], rediscover_s=0)
    try:
        await inventory.refresh()
        provider.fail = True
        statuses = await inventory.refresh()
        assert [s.state for s in statuses] == ["available"]
        assert inventory.provider_errors == {"flaky": "OSError: provider down"}
    finally:
        inventory.close()


async def test_snapshot_in_kv_and_gone_hosts_deleted(js_handles: JetStreamHandles, down_url: str) -> None:
    kv = js_handles.hosts
    local = engine("pve:pve1/101:worker-a", LOCAL, cpus=4, memory_bytes=8 * 2**30, source="proxmox:lab")
    gpu = Host(
        name="gpu.box",
        source="static",
        docker_url=LOCAL,
        cpus=16,
        memory_bytes=64 * 2**30,
        gpus=(Gpu(0, "A100", 80.0), Gpu(1, "A100", 80.0)),
        gpu_runtime=True,
        labels={**EngineEndpoint(LOCAL).labels(), "nats_url": "nats://u:secret@10.0.0.1:4222"},
    )
    provider = ListProvider("list", [local, gpu, engine("down", down_url)])
    inventory = Inventory([provider], rediscover_s=3600)
    try:
        await inventory.refresh()

        def usage(name: str) -> tuple[float, int, int, int]:
            return (1.5, 2 * 2**30, 1, 2) if name == "gpu.box" else (0.0, 0, 0, 0)

        await publish_snapshot(kv, inventory.snapshots(usage))
        assert sorted(e.key for e in await current_entries(kv)) == sorted(
            kv_key(n) for n in ("pve:pve1/101:worker-a", "gpu.box", "down")
        )
        assert kv_key("pve:pve1/101:worker-a") == "pve=3Apve1/101=3Aworker-a"
        entry = await kv.get(kv_key("gpu.box"))
        assert entry.value is not None
        snap = msgspec.json.decode(entry.value, type=HostSnapshot)
        assert snap.state == "available" and snap.source == "static"
        assert snap.free_cpus == 14.5 and snap.free_memory_bytes == 62 * 2**30
        assert snap.free_gpus == 1 and snap.running_ops == 2 and len(snap.gpus) == 2
        assert snap.checked_at > 0
        raw = entry.value.decode()
        assert "secret" not in raw and snap.labels["nats_url"] == "nats://u:***@10.0.0.1:4222"

        snaps = {s.name: s for s in await read_snapshot(kv)}
        assert snaps["down"].state == "unhealthy" and "no Docker socket" in snaps["down"].error

        provider.hosts = [local, gpu]
        await inventory.refresh(rediscover=True)
        await publish_snapshot(kv, inventory.snapshots())
        assert sorted(e.key for e in await current_entries(kv)) == sorted(
            kv_key(n) for n in ("pve:pve1/101:worker-a", "gpu.box")
        )
        with pytest.raises(KeyNotFoundError):
            await kv.get(kv_key("down"))

        # prune: keys this publisher does not know go too.
        await kv.put("stale-host", b"{}")
        await publish_snapshot(kv, inventory.snapshots(), prune=True)
        assert "stale-host" not in {e.key for e in await current_entries(kv)}
    finally:
        inventory.close()


def test_kv_keys_are_valid_and_distinct() -> None:
    import re

    names = ["pve:pve1/101:w1", "gpu.box", "gpu_box", "gpu=box", "a b", "ü", ".lead", "x..y"]
    keys = [kv_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"[-/_=a-zA-Z0-9]+", key), key


def test_snapshot_of_a_host_without_facts_keeps_the_providers_capacity() -> None:
    health = HostHealth()
    try:
        status = health.track(Host("h", "static", "ssh://ktrdr:hunter2@gpu.box", 8, 2**33, gpus=(Gpu(0),)))
        snap = snapshot_of(status, used_cpus=10, used_memory_bytes=1)
        assert snap.state == "unhealthy"  # never checked
        assert snap.free_cpus == 0 and snap.free_memory_bytes == 2**33 - 1 and snap.free_gpus == 1
        assert snap.docker_url == "ssh://ktrdr:***@gpu.box"
    finally:
        health.close()


async def test_run_publishes_until_stopped(js_handles: JetStreamHandles) -> None:
    import asyncio

    inventory = Inventory([ListProvider("list", [engine("local", LOCAL, cpus=2, memory_bytes=2**30)])])
    stop = asyncio.Event()
    seen: list[int] = []
    task = asyncio.create_task(
        inventory.run(stop, interval_s=0.05, kv=js_handles.hosts, on_refresh=lambda s: seen.append(len(s)))
    )
    try:
        for _ in range(100):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.05)
        snaps = await read_snapshot(js_handles.hosts)
        assert [(s.name, s.state) for s in snaps] == [("local", "available")]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        inventory.close()
    assert seen[:2] == [1, 1]
