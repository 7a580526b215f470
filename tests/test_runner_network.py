"""Op containers join the runners' own network: they reach NATS on their host's gateway
but not one another (the bridge's inter-container traffic is off)."""

from __future__ import annotations

import uuid

import docker
import pytest

from dispatcher.embedded import EmbeddedNats
from dispatcher.engine import RUNNER_NETWORK, RUNNER_USER, ensure_runner_network, hardened_host_config
from runner.protocol import Resources

pytestmark = [pytest.mark.docker, pytest.mark.nats]

LABEL = {"ktrdr.test": "runner-network"}
PYTHON = "/opt/ktrdr/venv/bin/python"
LISTEN = "import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(); time.sleep(60)"
CONNECT = """import socket, sys
s = socket.socket(); s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("reached")
except OSError as exc:
    print("blocked", exc)
"""


def hardened(api: docker.APIClient, image: str, code: str, *args: str) -> str:
    created = api.create_container(
        image,
        command=[PYTHON, "-c", code, *args],
        entrypoint=[],
        user=RUNNER_USER,
        labels={**LABEL, "ktrdr.test.id": uuid.uuid4().hex[:8]},
        host_config=hardened_host_config(
            api, Resources(cpus=0.25, memory_gb=0.25), pids_limit=32, scratch_mb=16
        ),
    )
    return str(created["Id"])


def test_a_container_reaches_nats_on_its_gateway_but_not_another_container(
    docker_client: docker.DockerClient, runner_image: str, nats_server: EmbeddedNats
) -> None:
    api = docker_client.api
    gateway = ensure_runner_network(api, "local")
    network = api.inspect_network(RUNNER_NETWORK)
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    listener = hardened(api, runner_image, LISTEN)
    probes: list[str] = []
    try:
        api.start(listener)
        address = api.inspect_container(listener)["NetworkSettings"]["Networks"][RUNNER_NETWORK]["IPAddress"]
        outcomes = {}
        for target, port in ((address, 8080), (gateway, nats_server.port)):
            probe = hardened(api, runner_image, CONNECT, target, str(port))
            probes.append(probe)
            api.start(probe)
            assert api.wait(probe, timeout=30)["StatusCode"] == 0
            outcomes[target] = api.logs(probe).decode().strip()
        assert outcomes[address].startswith("blocked"), outcomes  # another container: no
        assert outcomes[gateway] == "reached", outcomes  # NATS on the host: yes
    finally:
        for container in (listener, *probes):
            api.remove_container(container, force=True)
