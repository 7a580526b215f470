"""Roles on a real nats-server in operator mode, configured from a generated authority.

Each denial is the server's own permissions violation (seen through the client's error
callback) or its refusal to authenticate; each allowance is the real operation working.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from dispatcher.admission import Rejected, validate_job
from dispatcher.authority import Authority, write_secret
from dispatcher.config import Config, NatsConfig
from dispatcher.embedded import EmbeddedNats, free_port, nats_server_binary
from dispatcher.jetstream import ensure_jetstream
from dispatcher.natsjwt import CredentialError, decode_jwt, read_creds
from runner.protocol import ARTIFACTS_BUCKET, EVENTS_STREAM, OPS_BUCKET, op_subject, runner_inbox
from tests.conftest import run_cli, write_config

pytestmark = [pytest.mark.nats]


class Server:
    def __init__(self, server: EmbeddedNats, authority: Authority, directory: Path) -> None:
        self.server = server
        self.authority = authority
        self.directory = directory

    def creds(self, role: str, name: str, **kwargs: Any) -> str:
        text = self.authority.mint(role, name, **kwargs)  # type: ignore[arg-type]
        return str(write_secret(self.directory / f"{name}.creds", text))


@pytest.fixture
async def server(tmp_state: Path) -> AsyncIterator[Server]:
    authority = Authority.load_or_create(tmp_state)
    embedded = EmbeddedNats(tmp_state / "nats", free_port(), host="127.0.0.1", trust=authority.trust_block())
    await embedded.start()
    try:
        yield Server(embedded, authority, tmp_state)
    finally:
        embedded.stop()


class Conn:
    """A client and the errors the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc = NATS()

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def open(self, url: str, creds: str | None, inbox_prefix: str = "_INBOX") -> Conn:
        await self.nc.connect(
            url,
            user_credentials=creds,
            inbox_prefix=inbox_prefix.encode(),
            error_cb=self.on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
        return self

    async def violation(self, subject: str, timeout_s: float = 3.0) -> None:
        """Wait for the server's permissions violation naming ``subject``."""
        deadline = time.monotonic() + timeout_s
        while not any(
            "permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors
        ):
            assert time.monotonic() < deadline, (subject, self.errors)
            await asyncio.sleep(0.05)


async def connect(server: Server, creds: str | None, inbox_prefix: str = "_INBOX") -> Conn:
    return await Conn().open(server.server.url, creds, inbox_prefix)


async def prepared(server: Server) -> Conn:
    """The dispatcher's connection, with the streams and buckets created as in service."""
    conn = await connect(server, server.creds("dispatcher", "dispatcher"))
    config = Config(nats=NatsConfig(url=server.server.url))
    await ensure_jetstream(conn.nc, config, mode="apply")
    return conn


async def test_an_unauthenticated_or_expired_connection_is_refused(server: Server) -> None:
    for creds in (None, server.creds("runner", "expired", op_id="a", expires_at=time.time() - 5)):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(server, creds)


async def test_the_dispatcher_sets_up_jetstream_and_writes_records(server: Server) -> None:
    conn = await prepared(server)
    kv = await conn.nc.jetstream().key_value(OPS_BUCKET)
    await kv.put("op-1", b'{"op_id": "op-1"}')
    assert (await kv.get("op-1")).value == b'{"op_id": "op-1"}'
    await conn.nc.close()


async def test_an_observer_reads_but_cannot_publish_a_job_or_a_cancel(server: Server) -> None:
    dispatcher = await prepared(server)
    kv = await dispatcher.nc.jetstream().key_value(OPS_BUCKET)
    await kv.put("op-1", b'{"op_id": "op-1"}')
    await dispatcher.nc.jetstream().publish(op_subject("op-1", "status"), b'{"event": "status"}')
    observer = await connect(server, server.creds("observer", "dash"))
    js = observer.nc.jetstream()
    assert (await (await js.key_value(OPS_BUCKET)).get("op-1")).value == b'{"op_id": "op-1"}'
    sub = await js.subscribe("ktrdr.ops.op-1.>", ordered_consumer=True)
    assert (await sub.next_msg(timeout=5)).data == b'{"event": "status"}'
    await observer.nc.publish("ktrdr.jobs.probe", b"{}")
    await observer.violation("ktrdr.jobs.probe")
    await observer.nc.publish(op_subject("op-1", "cancel"), b"{}")
    await observer.violation(op_subject("op-1", "cancel"))
    await observer.nc.close()
    await dispatcher.nc.close()


async def test_a_submitter_submits_but_cannot_write_records_delete_streams_or_forge_events(
    server: Server,
) -> None:
    dispatcher = await prepared(server)
    submitter = await connect(server, server.creds("submitter", "ci-bot"))
    js = submitter.nc.jetstream()
    # jobs go out under its own name only: the server holds it to that
    ack = await js.publish(
        "ktrdr.jobs.probe.ci-bot", b'{"job_id": "j1", "kind": "probe"}', headers={"Nats-Msg-Id": "j1"}
    )
    assert ack.stream == "KTRDR_JOBS"
    for other in ("ktrdr.jobs.probe", "ktrdr.jobs.probe.alice"):
        await submitter.nc.publish(other, b"{}")
        await submitter.violation(other)
    await submitter.nc.publish(op_subject("j1", "cancel"), b"{}")  # allowed: no violation follows
    await submitter.nc.publish(f"$KV.{OPS_BUCKET}.j1", b'{"state": "completed"}')
    await submitter.violation(f"$KV.{OPS_BUCKET}.j1")
    await submitter.nc.publish(f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}", b"")
    await submitter.violation(f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}")
    await submitter.nc.publish(op_subject("j1", "result"), b"{}")
    await submitter.violation(op_subject("j1", "result"))
    assert not any(op_subject("j1", "cancel") in e for e in submitter.errors)
    info = await dispatcher.nc.jetstream().stream_info(EVENTS_STREAM)
    assert info.config.name == EVENTS_STREAM  # still there
    await submitter.nc.close()
    await dispatcher.nc.close()


async def test_a_submitters_requeue_is_recorded_under_its_credentials_name(server: Server) -> None:
    from dispatcher.opstore import OpStore
    from dispatcher.requeue import Requeuer
    from runner.protocol import REQUEUE_SUBJECT, ErrorInfo, OpRecord, requeue_subject

    dispatcher = await prepared(server)
    js = dispatcher.nc.jetstream()
    store = OpStore(await js.key_value(OPS_BUCKET), js)
    await store.create(
        OpRecord(
            op_id="j1",
            kind="probe",
            state="failed",
            params_digest="sha256:x",
            attempts=1,
            error=ErrorInfo(reason="op_error", message="boom"),
        )
    )
    published: list[OpRecord] = []

    async def publish_job(record: OpRecord) -> None:  # stands in for the job message
        published.append(record)

    requeuer = Requeuer(dispatcher.nc, js, store, dispatcher_id="d1", publish_job=publish_job)
    await requeuer.start()
    submitter = await connect(server, server.creds("submitter", "ci-bot"))
    # the name in the subject is the server-checked one; the message's claim does not count
    request = b'{"op_id": "j1", "requested_by": "mallory", "reason": "retry"}'
    reply = json.loads((await submitter.nc.request(requeue_subject("ci-bot"), request, timeout=10)).data)
    assert reply == {"op_id": "j1", "requeued": True, "state": "queued"}
    record = (await store.get("j1"))[0]
    assert [(h.state, h.requeued_by, h.requeue_reason) for h in record.history] == [
        ("failed", "ci-bot", "retry")
    ]
    assert [r.op_id for r in published] == ["j1"]
    for other in (REQUEUE_SUBJECT, requeue_subject("alice")):
        await submitter.nc.publish(other, request)
        await submitter.violation(other)
    observer = await connect(server, server.creds("observer", "dash"))
    await observer.nc.publish(requeue_subject("dash"), request)
    await observer.violation(requeue_subject("dash"))
    await requeuer.stop()
    for conn in (observer, submitter, dispatcher):
        await conn.nc.close()


async def test_a_runner_publishes_only_its_own_ops_events(server: Server) -> None:
    dispatcher = await prepared(server)
    creds = server.authority.mint_runner("op-a", valid_s=60)
    path = write_secret(server.directory / "runner-a.creds", creds)
    runner = await connect(server, str(path), inbox_prefix=runner_inbox("op-a"))
    js = runner.nc.jetstream()
    ack = await js.publish(op_subject("op-a", "progress"), b"{}")
    assert ack.stream == EVENTS_STREAM
    for subject in (
        op_subject("op-b", "result"),
        op_subject("op-a", "status"),
        op_subject("op-a", "cancel"),
        "ktrdr.jobs.probe",
        f"$KV.{OPS_BUCKET}.op-a",
        "ktrdr.uploads.op-b",  # another op's uploads
        f"$O.{ARTIFACTS_BUCKET}.M.c2hhMjU2LXg",  # the object store's write side
        f"$O.{ARTIFACTS_BUCKET}.C.chunk",
    ):
        await runner.nc.publish(subject, b"{}")
        await runner.violation(subject)
    await runner.nc.subscribe(op_subject("op-b", "cancel"))
    await runner.violation(op_subject("op-b", "cancel"))
    await runner.nc.close()
    await dispatcher.nc.close()


def test_minted_credentials_name_their_role_and_expiry(tmp_path: Path) -> None:
    authority = Authority.load_or_create(tmp_path)
    assert oct((tmp_path / "nats-auth" / "authority.json").stat().st_mode & 0o777) == "0o600"
    assert Authority.load_or_create(tmp_path).account.public == authority.account.public  # kept
    token, key = read_creds(authority.mint_runner("op-7", valid_s=30))
    claims = decode_jwt(token)
    assert claims["sub"] == key.public and claims["iss"] == authority.signer.public
    assert claims["nats"]["issuer_account"] == authority.account.public
    assert "role:runner" in claims["nats"]["tags"]
    assert 25 <= claims["exp"] - time.time() <= 31
    assert "ktrdr.ops.op-7.result" in claims["nats"]["pub"]["allow"]
    assert not any(s.startswith("ktrdr.jobs") for s in claims["nats"]["pub"]["allow"])
    (tmp_path / "nats-auth" / "authority.json").chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        Authority.load_or_create(tmp_path)
    json.dumps(msgspec.to_builtins(claims))


async def test_nats_config_and_creds_issue_work_with_any_nats_client(config: Config, tmp_state: Path) -> None:
    """``ktrdr-run nats config`` runs a real nats-server; ``creds issue`` logs a plain
    nats-py client into it; the cluster form writes one config per node."""
    config_path = write_config(config, tmp_state / "cli.toml")
    port = free_port()
    conf = tmp_state / "server.conf"
    made = await asyncio.to_thread(
        run_cli,
        [
            "nats",
            "config",
            "-o",
            str(conf),
            "--listen",
            f"127.0.0.1:{port}",
            "--store-dir",
            str(tmp_state / "js"),
        ],
        config_path,
    )
    assert made.returncode == 0, made.stderr
    creds = tmp_state / "dash.creds"
    issued = await asyncio.to_thread(
        run_cli, ["creds", "issue", "--role", "observer", "--name", "dash", "-o", str(creds)], config_path
    )
    assert issued.returncode == 0, issued.stderr
    assert oct(creds.stat().st_mode & 0o777) == "0o600" and oct(conf.stat().st_mode & 0o777) == "0o600"
    process = subprocess.Popen(  # noqa: ASYNC220 - a quick spawn
        [nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = await Conn().open(f"nats://127.0.0.1:{port}", str(creds))
                break
            except (OSError, nats.errors.Error):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        info = await conn.nc.jetstream().account_info()
        assert info.limits is not None
        await conn.nc.publish("ktrdr.jobs.probe", b"{}")
        await conn.violation("ktrdr.jobs.probe")
        await conn.nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Conn().open(f"nats://127.0.0.1:{port}", None)
    finally:
        process.terminate()
        process.wait(10)
    cluster = await asyncio.to_thread(
        run_cli, ["nats", "config", "-o", str(tmp_state / "node.conf"), "--cluster", "3"], config_path
    )
    assert cluster.returncode == 0, cluster.stderr
    texts = [(tmp_state / f"node-{i}.conf").read_text() for i in (1, 2, 3)]
    assert all(
        "routes: [nats://ktrdr-nats-1:6222, nats://ktrdr-nats-2:6222, nats://ktrdr-nats-3:6222]" in t
        for t in texts
    )
    assert all("sync_interval: always" in t and "resolver: MEMORY" in t for t in texts)
    bad = await asyncio.to_thread(
        run_cli, ["nats", "config", "-o", str(tmp_state / "x.conf"), "--cluster", "2"], config_path
    )
    assert bad.returncode == 2 and "at least 3" in bad.stderr


def test_the_submitter_named_in_the_subject_is_who_submitted(tmp_path: Path) -> None:
    """The dispatcher takes ``submitted_by`` from the subject the server let the publisher
    use, not from the message."""
    config = Config()
    forged = b'{"job_id": "j2", "kind": "probe", "submitted_by": "mallory"}'
    assert validate_job("ktrdr.jobs.probe.ci-bot", forged, config).job.submitted_by == "ci-bot"
    assert validate_job("ktrdr.jobs.probe", forged, config).job.submitted_by == "mallory"  # trusted path
    with pytest.raises(Rejected, match="kind 'probe' does not match"):
        validate_job("ktrdr.jobs.backtest.ci-bot", forged, config)
    with pytest.raises(Rejected, match="submitter name is not one token") as caught:
        validate_job("ktrdr.jobs.probe.ci.bot", forged, config)
    assert caught.value.field == "subject"
    with pytest.raises(ValueError, match="one subject token"):
        Authority.load_or_create(tmp_path).mint("submitter", "ci bot")
