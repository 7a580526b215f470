"""``probe`` with ``check_isolation``: what an op's own container can do to others.

The NATS checks run against a real nats-server: in operator mode (as in
tests/test_nats_auth.py) a runner's credentials are refused everything (each refusal the
server's own permissions violation), a dispatcher's are allowed everything; without
authentication everything is allowed. Where a check is allowed, nothing is stored. The
network check's address choice is a pure function; its probing runs against local
listeners. No Docker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from dispatcher.authority import Authority
from dispatcher.config import Config, NatsConfig
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.jetstream import ensure_jetstream
from runner.isolation import (
    CHECKS,
    NATS_CHECKS,
    Violations,
    candidate_addresses,
    check_publish,
    judge_reach,
    nats_checks,
    nats_endpoint,
    parse_routes,
    probe_addresses,
)
from runner.ops.probe import ProbeParams, probe
from runner.protocol import (
    EVENTS_STREAM,
    JOBS_STREAM,
    OPS_BUCKET,
    ResultEvent,
    RunnerSpec,
    event_decoder,
    op_subject,
)
from runner.sdk import OpContext
from runner.transport import EXIT_OK, NatsSink, connect, run_op

ROOT = Path(__file__).resolve().parent.parent
STREAMS = (JOBS_STREAM, EVENTS_STREAM, f"KV_{OPS_BUCKET}")


# --- a real nats-server in operator mode (as tests/test_nats_auth.py) -----------------


class Server:
    def __init__(self, server: EmbeddedNats, authority: Authority) -> None:
        self.server = server
        self.authority = authority

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
async def secured(tmp_state: Path) -> AsyncIterator[Server]:
    authority = Authority.load_or_create(tmp_state)
    embedded = EmbeddedNats(tmp_state / "nats", free_port(), host="127.0.0.1", trust=authority.trust_block())
    await embedded.start()
    try:
        yield Server(embedded, authority)
    finally:
        await asyncio.to_thread(embedded.stop)


def spec_for(url: str, op_id: str, **params: object) -> RunnerSpec:
    return RunnerSpec(op_id=op_id, kind="probe", params=dict(params), nats_url=url, ready_s=10)


async def dispatcher_side(url: str, creds: str = "") -> NATS:
    """A dispatcher's connection (as the runner's connect makes it), with the streams and
    buckets set up as in service."""
    nc = await connect(spec_for(url, "dispatcher-setup"), creds)
    await ensure_jetstream(nc, Config(nats=NatsConfig(url=url)), mode="apply")
    return nc


async def stored(nc: NATS) -> dict[str, tuple[int, int]]:
    """(messages, last sequence) of the job stream, the event stream and the op records."""
    js = nc.jetstream()
    states = {}
    for name in STREAMS:
        info = await js.stream_info(name)
        states[name] = (info.state.messages, info.state.last_seq)
    return states


async def assert_nothing_stored(nc: NATS, before: dict[str, tuple[int, int]], notes: dict[str, str]) -> None:
    assert await stored(nc) == before
    js = nc.jetstream()
    kv = await js.key_value(OPS_BUCKET)
    with contextlib.suppress(NoKeysError):
        assert not [key for key in await kv.keys() if key.startswith("isolation-")]
    other = notes["publish_other_op"].split("ktrdr.ops.")[1].split(".")[0]  # the random op id
    assert other.startswith("isolation-")
    with pytest.raises(KeyNotFoundError):
        await kv.get(other)
    for event in ("result", "cancel"):
        with pytest.raises(NotFoundError):
            await js.get_last_msg(EVENTS_STREAM, op_subject(other, event))


def split(checks: dict[str, tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    return {k: v for k, (v, _) in checks.items()}, {k: n for k, (_, n) in checks.items()}


# --- the NATS checks -------------------------------------------------------------------


async def test_a_runner_is_denied_every_nats_check(secured: Server, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = await dispatcher_side(secured.url, secured.authority.mint("dispatcher", "d"))
    violations = Violations()
    creds = secured.authority.mint_runner("op-a", 60)
    runner = await connect(spec_for(secured.url, "op-a"), creds, violations)
    before = await stored(dispatcher)
    caplog.set_level(logging.INFO, logger="ktrdr.runner")
    started = time.monotonic()
    verdicts, notes = split(await nats_checks(runner, violations))
    assert time.monotonic() - started < 5  # each refusal comes at once
    assert verdicts == dict.fromkeys(NATS_CHECKS, "denied"), notes
    assert all("permissions violation" in note for note in notes.values())
    assert "ktrdr.jobs.probe" in notes["publish_job"]
    assert f"$KV.{OPS_BUCKET}.isolation-" in notes["write_op_record"]
    # the provoked violations are the check's to report, not warnings in the runner's log
    assert not [r for r in caplog.records if "permissions violation" in r.getMessage()]
    # a violation nobody provoked still is one
    await runner.publish(op_subject("op-b", "progress"), b"{}")
    assert await violations.wait("publish", op_subject("op-b", "progress"), 3)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "op-b" in r.getMessage()]
    await assert_nothing_stored(dispatcher, before, notes)
    await runner.close()
    await dispatcher.close()


async def test_a_dispatcher_is_allowed_every_nats_check_and_nothing_is_stored(secured: Server) -> None:
    creds = secured.authority.mint("dispatcher", "d")
    dispatcher = await dispatcher_side(secured.url, creds)
    violations = Violations()
    checker = await connect(spec_for(secured.url, "op-d"), creds, violations)
    before = await stored(dispatcher)
    verdicts, notes = split(await nats_checks(checker, violations))
    assert verdicts == dict.fromkeys(NATS_CHECKS, "allowed"), notes
    for check, stream in (
        ("publish_other_op", EVENTS_STREAM),
        ("publish_job", JOBS_STREAM),
        ("write_op_record", f"KV_{OPS_BUCKET}"),
    ):
        assert f"reached stream {stream}" in notes[check] and "nothing was stored" in notes[check]
    assert "unsubscribed" in notes["hear_other_op"]
    await assert_nothing_stored(dispatcher, before, notes)
    await checker.close()
    await dispatcher.close()


async def test_without_authentication_every_nats_check_is_allowed_and_nothing_is_stored(
    nats_server: EmbeddedNats,
) -> None:
    dispatcher = await dispatcher_side(nats_server.url)
    violations = Violations()
    runner = await connect(spec_for(nats_server.url, "op-u"), "", violations)
    before = await stored(dispatcher)
    verdicts, notes = split(await nats_checks(runner, violations))
    assert verdicts == dict.fromkeys(NATS_CHECKS, "allowed"), notes
    await assert_nothing_stored(dispatcher, before, notes)
    await runner.close()
    await dispatcher.close()


async def test_no_answer_and_no_violation_is_unknown(nats_server: EmbeddedNats) -> None:
    violations = Violations()
    nc = await connect(spec_for(nats_server.url, "op-q"), "", violations)
    await nc.subscribe("quiet.subject")  # hears the publish, never answers it
    verdict, note = await check_publish(nc, violations, "quiet.subject", timeout_s=0.5)
    assert verdict == "unknown" and "no answer and no permissions violation" in note, note
    await nc.close()


async def test_a_runner_probe_reports_its_isolation_in_its_result(secured: Server) -> None:
    """The whole path: run_op connects with the op's credentials and the violations hook,
    the probe asks its context from the compute thread, the result event carries it."""
    dispatcher = await dispatcher_side(secured.url, secured.authority.mint("dispatcher", "d"))
    spec = spec_for(secured.url, "op-r", check_isolation=True)
    code = await run_op(spec, creds=secured.authority.mint_runner("op-r", 60))
    assert code == EXIT_OK
    message = await dispatcher.jetstream().get_last_msg(EVENTS_STREAM, op_subject("op-r", "result"))
    event = event_decoder.decode(message.data)
    assert isinstance(event, ResultEvent)
    isolation, notes = event.result["isolation"], event.result["isolation_notes"]
    assert list(isolation) == list(CHECKS) == list(notes)
    assert {name: isolation[name] for name in NATS_CHECKS} == dict.fromkeys(NATS_CHECKS, "denied"), notes
    assert isolation["reach_container"] in ("denied", "allowed", "unknown")
    await dispatcher.close()


async def test_the_nats_sink_runs_the_checks_from_the_compute_thread(nats_server: EmbeddedNats) -> None:
    dispatcher = await dispatcher_side(nats_server.url)
    violations = Violations()
    spec = spec_for(nats_server.url, "op-s")
    nc = await connect(spec, "", violations)
    sink = NatsSink(asyncio.get_running_loop(), nc, nc.jetstream(), spec, violations)
    ctx = OpContext(op_id="op-s", kind="probe", sink=sink)
    result = await asyncio.to_thread(probe, ctx, ProbeParams(check_isolation=True))
    assert {n: result["isolation"][n] for n in NATS_CHECKS} == dict.fromkeys(NATS_CHECKS, "allowed")
    assert set(result["isolation_notes"]) == set(CHECKS)
    # without the hook no refusal could be seen: the NATS checks say so rather than guess
    bare = NatsSink(asyncio.get_running_loop(), nc, nc.jetstream(), spec)
    checks = await asyncio.to_thread(bare.check_isolation)
    assert {n: checks[n][0] for n in NATS_CHECKS} == dict.fromkeys(NATS_CHECKS, "unknown")
    await nc.close()
    await dispatcher.close()


# --- violations ------------------------------------------------------------------------


async def test_violations_are_matched_by_action_and_subject() -> None:
    violations = Violations()
    assert not violations.record(Exception("nats: unexpected EOF"))
    # nats-py passes the server's -ERR on lower-cased
    assert not violations.record(Exception('nats: permissions violation for publish to "ktrdr.jobs.probe"'))
    assert violations.seen("publish", "ktrdr.jobs.probe")
    assert not violations.seen("subscription", "ktrdr.jobs.probe")
    with violations.expecting("subscription", "ktrdr.ops.X.cancel"):
        waiting = asyncio.ensure_future(violations.wait("subscription", "ktrdr.ops.X.cancel", 2))
        await asyncio.sleep(0.05)
        said = 'nats: permissions violation for subscription to "ktrdr.ops.x.cancel" using queue "q"'
        assert violations.record(Exception(said))  # expected: the caller need not warn
        assert await waiting
    assert not violations.record(Exception(said))  # no longer expected
    assert not await violations.wait("publish", "nothing.here", 0.1)
    since = violations.mark()
    assert violations.seen("publish", "ktrdr.jobs.probe") and not violations.seen(
        "publish", "ktrdr.jobs.probe", since
    )  # an earlier refusal does not answer a later check


# --- the network check -----------------------------------------------------------------


def test_candidates_skip_the_gateway_and_itself_and_stay_bounded() -> None:
    candidates = candidate_addresses("172.30.0.5", 16, "172.30.0.1")
    assert len(candidates) == 64 == len(set(candidates))
    assert "172.30.0.1" not in candidates and "172.30.0.5" not in candidates
    assert candidates[:3] == ["172.30.0.2", "172.30.0.3", "172.30.0.4"]  # handed out after the gateway
    assert {"172.30.0.6", "172.30.0.37"} <= set(candidates)  # and around its own
    net = ipaddress.IPv4Network("172.30.0.0/16")
    assert all(ipaddress.IPv4Address(a) in net for a in candidates)
    far = candidate_addresses("10.9.200.17", 8, "10.0.0.1", limit=10)
    assert far[:5] == [f"10.0.0.{i}" for i in range(2, 7)]
    assert far[5:] == ["10.9.200.18", "10.9.200.16", "10.9.200.19", "10.9.200.15", "10.9.200.20"]


def test_candidates_in_small_subnets_and_at_their_edges() -> None:
    assert candidate_addresses("192.168.7.2", 29, "192.168.7.1") == [
        "192.168.7.3",
        "192.168.7.4",
        "192.168.7.5",
        "192.168.7.6",
    ]
    assert candidate_addresses("192.168.7.2", 30, "192.168.7.1") == []
    assert candidate_addresses("192.168.7.2", 31, None) == candidate_addresses("192.168.7.2", 32, None) == []
    edge = candidate_addresses("10.1.2.254", 24, "10.1.2.1", exclude=("10.1.2.2",))
    assert "10.1.2.255" not in edge and "10.1.2.0" not in edge and "10.1.2.2" not in edge
    assert "10.1.2.253" in edge and len(edge) == 64
    assert candidate_addresses("10.1.2.9", 24, "10.1.2.1", limit=0) == []


def test_routes_and_the_nats_endpoint_are_read() -> None:
    def hexed(address: str) -> str:
        return f"{struct.unpack('=I', socket.inet_aton(address))[0]:08X}"

    header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    text = header + "".join(
        f"eth0\t{hexed(dest)}\t{hexed(gw)}\t0003\t0\t0\t0\t{hexed(mask)}\t0\t0\t0\n"
        for dest, gw, mask in (
            ("0.0.0.0", "172.30.0.1", "0.0.0.0"),
            ("172.30.0.0", "0.0.0.0", "255.255.0.0"),
        )
    )
    default, link = parse_routes(text + "garbage\n")
    assert (default.destination, default.gateway, default.prefix) == ("0.0.0.0", "172.30.0.1", 0)
    assert (link.destination, link.gateway, link.prefix, link.iface) == ("172.30.0.0", "0.0.0.0", 16, "eth0")
    assert nats_endpoint("nats://user:pw@172.30.0.1:4333,nats://other:1") == ("172.30.0.1", 4333)
    assert nats_endpoint("tls://nats.example") == ("nats.example", 4222)
    assert nats_endpoint("") == ("", 4222)


async def test_an_answering_address_means_another_container_is_reachable() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        outcomes = await probe_addresses(["127.0.0.2", "127.0.0.3"], port, timeout_s=1.0)
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes == {"127.0.0.2": "accepted", "127.0.0.3": "refused"}  # a refusal answers too
    verdict, note = judge_reach(outcomes, "of 127.0.0.0/8", port, 1.0)
    assert verdict == "allowed"
    assert "127.0.0.2 (accepted)" in note and "127.0.0.3 (refused)" in note


async def test_addresses_that_drop_the_connect_mean_denied() -> None:
    """A listener whose accept queue is full drops new connects, as a bridge without
    inter-container traffic drops them."""
    if Path("/proc/sys/net/ipv4/tcp_abort_on_overflow").read_text().strip() != "0":
        pytest.skip("this kernel answers an overflowing accept queue with a reset")
    listener = socket.socket()
    listener.bind(("127.0.0.4", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.4", port))
        fillers.append(filler)
    await asyncio.sleep(0.2)
    try:
        started = time.monotonic()
        outcomes = await probe_addresses(["127.0.0.4"], port, timeout_s=0.5)
        assert time.monotonic() - started < 2
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert outcomes == {"127.0.0.4": "timed out"}
    verdict, note = judge_reach(outcomes, "of 127.0.0.0/8", port, 0.5)
    assert verdict == "denied" and "1 addresses" in note and "none answered" in note


# --- a local run -----------------------------------------------------------------------


def test_a_local_run_reports_isolation_with_the_nats_checks_unknown() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runner", "--stdout", "probe", "check_isolation=true"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result["isolation"]) == list(CHECKS) == list(result["isolation_notes"])
    for name in NATS_CHECKS:
        assert result["isolation"][name] == "unknown"
        assert result["isolation_notes"][name] == "no NATS connection (local run)"
    assert result["isolation"]["reach_container"] in ("denied", "allowed", "unknown")
    assert result["isolation_notes"]["reach_container"]
    msgspec.json.encode(result)
