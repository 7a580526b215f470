"""The secure default, end to end: what a user gets with nothing configured.

The session starts the embedded nats-server (as the one-command backtest does): operator
mode with the deployment's own trust chain, listening on loopback and, for containers,
on the runners' network gateway only. Ops run with per-op credentials that arrive on the
container's standard input and never show in ``docker inspect``. A person's credentials
(``[nats] creds``) publish jobs under their own name and never run a dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import msgspec
import nats
import pytest
from nats.aio.client import RawCredentials

from dispatcher.authority import AUTH_DIR, AUTHORITY_FILE, Authority, write_secret
from dispatcher.config import Config, NatsConfig
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.engine import RUNNER_NETWORK, RUNNER_USER, ensure_runner_network, hardened_host_config
from dispatcher.jetstream import ensure_jetstream
from ktrdr_run.session import Session
from runner.isolation import candidate_addresses
from runner.protocol import TERMINAL_STATES, Job, OpRecord, Resources
from tests.conftest import run_cli, write_config

pytestmark = [pytest.mark.docker, pytest.mark.nats]

ISOLATION_CHECKS = ("publish_other_op", "publish_job", "write_op_record", "hear_other_op", "reach_container")
PYTHON = "/opt/ktrdr/venv/bin/python"
LISTEN = "import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(); time.sleep(60)"
#: What a credential looks like: a creds file's armour, a JWT's header, an nkey seed.
SECRET_PATTERNS = (r"BEGIN NATS", r"NKEY SEED", r"eyJ0eXAiOiJKV1Qi", r"\bS[UAO][A-Z2-7]{54,}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def default_config(config: Config, tmp_state: Path) -> Config:
    """The test config with NATS left at its default behaviour: nothing answers at the URL,
    so the session starts the embedded server (on a free port, its store in the test's
    state directory)."""
    url = f"nats://127.0.0.1:{free_port()}"
    return msgspec.structs.replace(
        config, nats=NatsConfig(url=url, embedded=True, store_dir=str(tmp_state / "embedded"))
    )


@contextlib.contextmanager
def extra_address() -> Iterator[str]:
    """A non-loopback address of this machine that is not the runners' gateway: a link of
    its own (a bridge: this kernel has no dummy links) with an address from TEST-NET-2
    (198.51.100.0/24), removed afterwards."""
    link = f"kdum{uuid.uuid4().hex[:6]}"
    address = f"198.51.100.{uuid.uuid4().int % 200 + 20}"
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", link], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True, capture_output=True)
        yield address
    finally:
        subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)


def answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


async def wait_record(session: Session, op_id: str, states: set[str], timeout_s: float = 60) -> OpRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            record = await session.record(op_id)
            if record.state in states:
                return record
        await asyncio.sleep(0.1)
    raise AssertionError(f"op {op_id} did not reach {states} within {timeout_s}s")


async def test_the_default_setup_is_authenticated_confined_and_hides_credentials(
    default_config: Config,
    tmp_state: Path,
    docker_client: docker.DockerClient,
    runner_image: str,
    no_leftover_containers: None,
) -> None:
    url = default_config.nats.url
    port = int(url.rsplit(":", 1)[1])
    async with Session(default_config, setup="create") as session:
        assert session.embedded is not None, "the session should have started the embedded server"
        authority_file = tmp_state / AUTH_DIR / AUTHORITY_FILE
        assert oct(authority_file.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_state / "embedded" / "nats-server.conf").stat().st_mode & 0o777) == "0o600"

        # nobody without credentials gets in
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        with pytest.raises(Exception) as refused:
            await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=2)
        assert any("authorization" in said.lower() for said in [str(refused.value), *errors]), (
            refused.value,
            errors,
        )

        # a neighbour on the runners' network that would answer anyone reaching it
        api = docker_client.api
        await asyncio.to_thread(ensure_runner_network, api, "local")
        peer = api.create_container(
            runner_image,
            command=[PYTHON, "-c", LISTEN],
            entrypoint=[],
            user=RUNNER_USER,
            labels={"ktrdr.test": "secure-default-peer"},
            host_config=hardened_host_config(
                api, Resources(cpus=0.1, memory_gb=0.125), pids_limit=16, scratch_mb=16
            ),
        )["Id"]
        api.start(peer)
        try:
            job = Job(
                job_id=new_id("secure"),
                kind="probe",
                params={"hold_s": 3, "check_isolation": True},
                resources=Resources(cpus=0.25, memory_gb=0.25),
            )
            op_id = await session.submit(job)
            running = await wait_record(session, op_id, {"running"})
            probe_net = api.inspect_container(running.container_id)["NetworkSettings"]["Networks"][
                RUNNER_NETWORK
            ]
            peer_ip = api.inspect_container(peer)["NetworkSettings"]["Networks"][RUNNER_NETWORK]["IPAddress"]
            inspected = api.inspect_container(running.container_id)
            shown = json.dumps({"Config": inspected["Config"], "HostConfig": inspected["HostConfig"]})
            for pattern in SECRET_PATTERNS:
                assert not re.search(pattern, shown), f"docker inspect shows a credential ({pattern})"
            assert inspected["Config"]["OpenStdin"] is True  # the credentials came that way
            done = await wait_record(session, op_id, TERMINAL_STATES)
        finally:
            api.remove_container(peer, force=True)
        assert done.state == "completed", done.error
        assert done.result is not None
        # every way out of its own op is closed, the neighbour included
        assert done.result["isolation"] == dict.fromkeys(ISOLATION_CHECKS, "denied"), done.result[
            "isolation_notes"
        ]
        tried = candidate_addresses(probe_net["IPAddress"], probe_net["IPPrefixLen"], probe_net["Gateway"])
        assert peer_ip in tried, (peer_ip, tried)

        # the server answers on loopback and on the runners' gateway, nowhere else
        network = docker_client.api.inspect_network(RUNNER_NETWORK)
        gateway = next(c["Gateway"] for c in network["IPAM"]["Config"] if c.get("Gateway"))
        assert answers("127.0.0.1", port)
        assert answers(gateway, port), "containers' gateway: the runner connected through it"
        with extra_address() as elsewhere:
            assert not answers(elsewhere, port), f"the embedded server answers on {elsewhere}"
    assert not answers("127.0.0.1", port), "the embedded server outlived the session"
    assert not answers(gateway, port), "the forwarder outlived the session"


async def test_a_persons_credentials_submit_under_their_name_and_never_dispatch(
    config: Config, tmp_state: Path, runner_image: str, no_leftover_containers: None
) -> None:
    """An operator's own authenticated server (from the deployment's authority): a CLI
    configured with a submitter's credentials publishes on its own job subject and, with
    no dispatcher answering, leaves the op queued rather than running a dispatcher it has
    no rights for; one with no credentials is refused at once, saying what to set."""
    authority = Authority.load_or_create(tmp_state / "operator")
    server = EmbeddedNats(tmp_state / "secured", free_port(), trust=authority.trust_block())
    await server.start()
    try:
        setup = await connect(
            server.url, name="setup", credentials=RawCredentials(authority.mint("dispatcher", "x"))
        )
        base = msgspec.structs.replace(config, nats=NatsConfig(url=server.url, embedded=False))
        await ensure_jetstream(setup, base, mode="apply")
        creds = write_secret(tmp_state / "alice.creds", authority.mint("submitter", "alice"))

        people = tmp_state / "people"  # a state directory without the authority
        no_creds = msgspec.structs.replace(base, state_dir=str(people))
        anonymous = write_config(no_creds, tmp_state / "anon.toml")
        started = time.monotonic()
        refused = await asyncio.to_thread(run_cli, ["ops", "list"], anonymous, 60)
        assert refused.returncode != 0
        assert "refused ktrdr-run's credentials" in refused.stderr and "[nats] creds" in refused.stderr
        assert time.monotonic() - started < 20, "a refusal should not wait out retries"

        alice_cfg = msgspec.structs.replace(
            base, state_dir=str(people), nats=NatsConfig(url=server.url, embedded=False, creds=str(creds))
        )
        alice = write_config(alice_cfg, tmp_state / "alice.toml")
        submitted = await asyncio.to_thread(
            run_cli, ["submit", "probe", "--detach", "--json", "--cpus", "0.25"], alice, 60
        )
        assert submitted.returncode == 0, submitted.stderr
        op_id = json.loads(submitted.stdout)["op_id"]
        # what reached the queue came in on alice's own subject
        stream = await setup.jetstream().stream_info("KTRDR_JOBS", subjects_filter=">")
        assert stream.state.subjects == {"ktrdr.jobs.probe.alice": 1}, stream.state.subjects
        assert op_id
        listed = await asyncio.to_thread(run_cli, ["ops", "list", "--json"], alice, 60)
        assert listed.returncode == 0, listed.stderr
        notes: list[str] = []
        async with Session(alice_cfg, progress=notes.append) as session:  # needs a dispatcher
            assert not session.may_dispatch and session.submitter_name == "alice"
            assert session._dispatcher is None, "a submitter's session started a dispatcher"
        await setup.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_dispatcher_joining_an_embedded_server_another_command_started_gets_its_ops_through(
    default_config: Config, no_leftover_containers: None, runner_image: str
) -> None:
    """A dashboard (say) started the embedded server; a later command with a dispatcher
    of its own joins it, and its containers still reach the loopback-only server (through
    that command's own forwarder)."""
    async with Session(default_config, need_dispatcher=False, setup="create") as first:
        assert first.embedded is not None
        async with Session(default_config, setup="create") as second:
            assert second.embedded is None and second.forwarder is not None
            op_id = await second.submit(
                Job(job_id=new_id("joined"), kind="probe", resources=Resources(cpus=0.25, memory_gb=0.25))
            )
            done = await wait_record(second, op_id, TERMINAL_STATES)
            assert done.state == "completed", done.error
            assert second.forwarder.addresses, "the joining command forwarded nothing"
