"""Proxmox discovery: the real proxmoxer client against a fake PVE API over HTTPS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from discovery.base import DiscoveryError
from discovery.config import ProxmoxConfig, ProxmoxWorkerTag
from discovery.proxmox import ProxmoxProvider, address_from_config, parse_tags, pick_address
from dispatcher.embedded import free_port
from tests.proxmox_fake import GIB, FakeProxmox, iface, loopback


@pytest.fixture
def pve(tmp_path: Path) -> Iterator[FakeProxmox]:
    server = FakeProxmox(tmp_path / "pve").start()
    yield server
    server.stop()


def cluster(pve: FakeProxmox, **overrides: object) -> ProxmoxConfig:
    values: dict[str, object] = {
        "name": "lab",
        "host": pve.host,
        "port": pve.port,
        "user": pve.user,
        "token_name": pve.token_name,
        "token_value": pve.token_value,
        "ca_file": pve.ca_file,
        "timeout_s": 3.0,
        "workers": [
            ProxmoxWorkerTag(
                tag="ktrdr-worker",
                docker_url_template="tcp://{address}:2376",
                tls_ca="/etc/ktrdr/ca.pem",
                tls_cert="/etc/ktrdr/cert.pem",
                tls_key="/etc/ktrdr/key.pem",
                nats_url="nats://10.10.0.1:4222",
            )
        ],
    }
    values.update(overrides)
    return msgspec.convert(values, ProxmoxConfig, from_attributes=True)


def test_finds_running_tagged_lxc_with_address_capacity_and_docker_url(pve: FakeProxmox) -> None:
    provider = ProxmoxProvider(cluster(pve))
    hosts = {h.name: h for h in provider.discover()}

    # Running LXC with the tag only: not the qemu VM with the tag, not the stopped CT or
    # the template, not the untagged / differently tagged CTs.
    assert sorted(hosts) == [
        "pve:pve1/101:worker-a",
        "pve:pve1/108:worker-legacy",
        "pve:pve2/102:worker-v6",
        "pve:pve2/106:worker-old-pve",
    ]
    a = hosts["pve:pve1/101:worker-a"]
    # lo (127.0.0.1) comes first and docker0 (172.17.0.1) after eth0: neither is the address.
    assert a.docker_url == "tcp://10.10.0.101:2376"
    assert a.cpus == 4.0 and a.memory_bytes == 8 * GIB
    assert a.source == "proxmox:lab"
    assert a.labels["node"] == "pve1" and a.labels["vmid"] == "101"
    assert a.labels["tag"] == "ktrdr-worker" and a.labels["tags"] == "gpu;ktrdr-worker"
    assert a.labels["address"] == "10.10.0.101"
    assert a.labels["docker.tls_cert"] == "/etc/ktrdr/cert.pem"
    assert a.labels["nats_url"] == "nats://10.10.0.1:4222"

    # Only link-local and a global IPv6 address: the global one, bracketed in the URL.
    v6 = hosts["pve:pve2/102:worker-v6"]
    assert v6.docker_url == "tcp://[2001:db8::102]:2376"
    assert v6.labels["address"] == "2001:db8::102"

    # PVE 8.1-8.3 shape (inet / inet6 only).
    assert hosts["pve:pve1/108:worker-legacy"].docker_url == "tcp://10.10.0.108:2376"
    # No interfaces endpoint (PVE < 8.1): the static ip of net0.
    old = hosts["pve:pve2/106:worker-old-pve"]
    assert old.docker_url == "tcp://10.10.0.106:2376"
    assert old.cpus == 6.0 and old.memory_bytes == 12 * GIB

    # One listing call, then interfaces per match (config only where interfaces failed).
    assert pve.requests[0] == "GET /api2/json/cluster/resources?type=vm"
    assert sum(r.startswith("GET /api2/json/cluster/resources") for r in pve.requests) == 1
    assert "GET /api2/json/nodes/pve1/lxc/101/interfaces" in pve.requests
    assert "GET /api2/json/nodes/pve2/lxc/106/config" in pve.requests
    assert not any("/103/" in r or "/104/" in r or "/100/" in r for r in pve.requests)


def test_the_first_configured_tag_wins_and_tls_files_are_per_tag(pve: FakeProxmox) -> None:
    workers = msgspec.convert(
        [
            {"tag": "gpu", "docker_url_template": "ssh://ktrdr@{address}", "gpus": [{"index": 0}]},
            {"tag": "ktrdr-worker", "docker_url_template": "tcp://{address}:2375", "tls_verify": False},
        ],
        list[ProxmoxWorkerTag],
    )
    hosts = {h.name: h for h in ProxmoxProvider(cluster(pve, workers=workers)).discover()}
    assert hosts["pve:pve1/101:worker-a"].docker_url == "ssh://ktrdr@10.10.0.101"
    assert hosts["pve:pve1/101:worker-a"].labels["tag"] == "gpu"
    assert len(hosts["pve:pve1/101:worker-a"].gpus) == 1
    assert hosts["pve:pve2/102:worker-v6"].docker_url == "tcp://[2001:db8::102]:2375"
    assert hosts["pve:pve2/102:worker-v6"].labels["docker.tls_verify"] == "0"


def test_the_fake_serves_the_other_paths_proxmoxer_calls(pve: FakeProxmox) -> None:
    """The shapes behind /nodes, /nodes/{node}/lxc, config and status, through proxmoxer."""
    from proxmoxer import ProxmoxAPI

    api = ProxmoxAPI(
        pve.host,
        port=pve.port,
        user=pve.user,
        token_name=pve.token_name,
        token_value=pve.token_value,
        verify_ssl=pve.ca_file,
        service="PVE",
    )
    assert [n["node"] for n in api.nodes.get()] == ["pve1", "pve2"]
    lxcs = api.nodes("pve2").lxc.get()
    assert {str(c["vmid"]) for c in lxcs} == {"102", "105", "106"}
    assert all(isinstance(c["vmid"], str) for c in lxcs)  # older PVE returns vmid as a string
    config = api.nodes("pve2").lxc(106).config.get()
    assert address_from_config(config) == "10.10.0.106"
    assert api.nodes("pve1").lxc(101).status.current.get()["status"] == "running"
    assert api.nodes("pve1").lxc(103).interfaces.get() is None  # stopped: no interfaces
    assert pick_address(api.nodes("pve1").lxc(101).interfaces.get()) == "10.10.0.101"


def test_bad_token_is_a_clear_error_without_the_secret(pve: FakeProxmox) -> None:
    secret = "d7c1a0e2-wrong-secret-9f4b"
    with pytest.raises(DiscoveryError) as info:
        ProxmoxProvider(cluster(pve, token_value=secret)).discover()
    message = str(info.value)
    assert "Proxmox lab" in message and f"127.0.0.1:{pve.port}" in message
    assert "rejected the API token ktrdr@pve!discovery" in message and "401" in message
    assert secret not in message and pve.token_value not in message


def test_unreachable_port_is_a_clear_error(pve: FakeProxmox) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(DiscoveryError) as info:
        ProxmoxProvider(cluster(pve, port=port)).discover()
    message = str(info.value)
    assert f"Proxmox lab (https://127.0.0.1:{port}) is unreachable" in message
    assert "Connection refused" in message
    assert pve.token_value not in message
    assert time.monotonic() - started < 10


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_untrusted_certificate_says_how_to_fix_it(pve: FakeProxmox) -> None:
    with pytest.raises(DiscoveryError) as info:
        ProxmoxProvider(cluster(pve, ca_file="")).discover()  # system CAs do not know the fake's CA
    message = str(info.value)
    assert "TLS certificate is not trusted" in message and "ca_file" in message
    hosts = ProxmoxProvider(cluster(pve, ca_file="", verify_ssl=False)).discover()
    assert len(hosts) == 4


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gpu;ktrdr-worker", ["gpu", "ktrdr-worker"]),
        ("ktrdr-worker,gpu", ["ktrdr-worker", "gpu"]),
        ("ktrdr-worker gpu", ["ktrdr-worker", "gpu"]),
        (" GPU ; Ktrdr-Worker,, web  a.b+c ", ["gpu", "ktrdr-worker", "web", "a.b+c"]),
        ("gpu;gpu", ["gpu"]),
        ("", []),
        (None, []),
    ],
)
def test_tag_parsing(raw: str | None, expected: list[str]) -> None:
    assert parse_tags(raw) == expected


def test_address_picking_rules() -> None:
    assert pick_address(None) == ""
    assert pick_address([loopback()]) == ""
    assert pick_address([loopback(), iface("eth0", "m", [("inet6", "fe80::1", 64)])]) == ""
    # IPv4 anywhere beats IPv6 on an earlier interface.
    both = [
        loopback(),
        iface("eth0", "m", [("inet6", "2001:db8::5", 64)]),
        iface("eth1", "m", [("inet", "192.168.7.5", 24)]),
    ]
    assert pick_address(both) == "192.168.7.5"
    assert address_from_config({"net0": "name=eth0,bridge=vmbr0,ip=dhcp,ip6=2001:db8::9/64"}) == "2001:db8::9"
    assert address_from_config({"net0": "name=eth0,ip=manual"}) == ""


def test_config_validation_names_the_field() -> None:
    base = {"name": "lab", "host": "pve", "user": "root@pam", "token_name": "t", "token_value": "s"}
    with pytest.raises(msgspec.ValidationError, match="workers: list at least one"):
        msgspec.convert(base, ProxmoxConfig)
    with pytest.raises(msgspec.ValidationError, match="tag: 'Ktrdr Worker' is not a Proxmox tag"):
        msgspec.convert({**base, "workers": [{"tag": "Ktrdr Worker"}]}, ProxmoxConfig)
    with pytest.raises(msgspec.ValidationError, match=r"docker_url_template: .* must contain \{address\}"):
        msgspec.convert(
            {**base, "workers": [{"tag": "w", "docker_url_template": "tcp://x:2376"}]}, ProxmoxConfig
        )
    with pytest.raises(msgspec.ValidationError, match=r"tls_ca, tls_cert, tls_key: .* needs"):
        msgspec.convert({**base, "workers": [{"tag": "w"}]}, ProxmoxConfig)
    with pytest.raises(msgspec.ValidationError, match=r"token_value: .*PVE_TOKEN"):
        msgspec.convert(
            {**base, "token_value": "", "workers": [{"tag": "w", "tls_verify": False}]}, ProxmoxConfig
        )
    with pytest.raises(msgspec.ValidationError, match="user: 'root' must be USER@REALM"):
        msgspec.convert(
            {**base, "user": "root", "workers": [{"tag": "w", "tls_verify": False}]}, ProxmoxConfig
        )
