"""What an op's own container can do to others: the checks behind ``probe``'s
``check_isolation``.

Each check tries one thing a runner must not be able to do and says ``denied``,
``allowed`` or (only when nothing was seen either way within its deadline) ``unknown``,
with one sentence saying what was tried and what came back:

- ``publish_other_op``: publish to another op's event subject;
- ``publish_job``: publish a job;
- ``write_op_record``: write an op record (a KV put);
- ``hear_other_op``: subscribe to another op's cancel subject;
- ``reach_container``: open a TCP connection to another container on its network.

Nothing is changed even where a check is allowed: the publishes are JetStream publishes
that expect a last subject sequence no subject has (999999999), so the stream refuses
to store them and its "wrong last sequence" answer proves the publish reached it. A
refusal is the server's own permissions violation, which nats-py hands to the
connection's error callback: :class:`Violations` records those (the runner's
``connect`` feeds it) so a check can wait for the one naming its subject.

Only the standard library, nats-py and msgspec: this runs inside the runner image.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import msgspec
from nats.errors import NoRespondersError

from runner.protocol import OPS_BUCKET, job_subject, op_subject

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = logging.getLogger("ktrdr.runner.isolation")

Verdict = Literal["denied", "allowed", "unknown"]
#: check name -> (verdict, one sentence saying what was tried and what was seen)
Checks = dict[str, tuple[Verdict, str]]

NATS_CHECKS = ("publish_other_op", "publish_job", "write_op_record", "hear_other_op")
CHECKS = (*NATS_CHECKS, "reach_container")

#: A last subject sequence no subject has: a stream refuses the publish, storing nothing.
IMPOSSIBLE_SEQUENCE = "999999999"
NO_STORE_HEADERS = {"Nats-Expected-Last-Subject-Sequence": IMPOSSIBLE_SEQUENCE}
WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed expected-sequence check

PUBLISH_WAIT_S = 3.0
SUBSCRIBE_WAIT_S = 1.0
CONNECT_WAIT_S = 1.0
MAX_ADDRESSES = 64
TOTAL_DEADLINE_S = 10.0
DEFAULT_NATS_PORT = 4222

_VIOLATION_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.IGNORECASE)


# --- permissions violations ------------------------------------------------------------


Action = Literal["publish", "subscription"]


@dataclass(frozen=True, slots=True)
class Violation:
    """One permissions violation the server reported."""

    action: Action
    subject: str  # as nats-py passes it on: lower-cased


class Violations:
    """The permissions violations the server reported on one connection (the latest
    ``keep``). The connection's error callback calls :meth:`record`; checks announce the
    subjects they provoke with :meth:`expecting` and wait with :meth:`wait`, for one
    reported after :meth:`mark`. Lives on the connection's event loop."""

    def __init__(self, keep: int = 256) -> None:
        self._seen: collections.deque[tuple[int, Violation]] = collections.deque(maxlen=keep)
        self._count = 0
        self._expected: collections.Counter[Violation] = collections.Counter()
        self._changed: asyncio.Event | None = None

    @staticmethod
    def parse(error: BaseException | str) -> Violation | None:
        """The violation an error names, or None when it is not one."""
        found = _VIOLATION_RE.search(str(error))
        if found is None:
            return None
        action: Action = "publish" if found.group(1).lower() == "publish" else "subscription"
        return Violation(action, found.group(2).lower())

    def record(self, error: BaseException | str) -> bool:
        """Note ``error`` if it is a permissions violation; True when a check provoked it
        on purpose (the caller need not warn about it)."""
        violation = self.parse(error)
        if violation is None:
            return False
        self._count += 1
        self._seen.append((self._count, violation))
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if self._expected[violation]:
            log.debug("provoked on purpose: %s", error)
            return True
        return False

    @contextlib.contextmanager
    def expecting(self, action: Action, subject: str) -> Iterator[None]:
        """While inside, a violation for ``subject`` is one a check asked for."""
        key = Violation(action, subject.lower())
        self._expected[key] += 1
        try:
            yield
        finally:
            self._expected[key] -= 1
            if self._expected[key] <= 0:
                del self._expected[key]

    def mark(self) -> int:
        """Where the record stands now: pass it as ``since`` to see only what follows."""
        return self._count

    def seen(self, action: Action, subject: str, since: int = 0) -> bool:
        """Whether the server reported a violation for ``subject`` (after ``since``)."""
        wanted = Violation(action, subject.lower())
        return any(number > since and violation == wanted for number, violation in self._seen)

    async def wait(self, action: Action, subject: str, timeout_s: float, since: int = 0) -> bool:
        """Whether a violation for ``subject`` (after ``since``) comes within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.seen(action, subject, since):
            left = deadline - loop.time()
            if left <= 0:
                return False
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True


# --- the NATS checks -------------------------------------------------------------------


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    error: dict[str, object] | None = None


def _tried(subject: str) -> str:
    return f"A JetStream publish to {subject} (expecting last subject sequence {IMPOSSIBLE_SEQUENCE})"


async def check_publish(
    nc: NATS, violations: Violations, subject: str, *, timeout_s: float = PUBLISH_WAIT_S
) -> tuple[Verdict, str]:
    """Publish to ``subject`` with the no-store header: ``denied`` on a permissions
    violation naming it, ``allowed`` on any answer (a stream's, or no responders)."""
    tried = _tried(subject)
    since = violations.mark()
    with violations.expecting("publish", subject):
        request = asyncio.ensure_future(
            nc.request(subject, b"", timeout=timeout_s, headers=dict(NO_STORE_HEADERS))
        )
        refused = asyncio.ensure_future(violations.wait("publish", subject, timeout_s, since))
        try:
            await asyncio.wait(
                {request, refused}, timeout=timeout_s + 0.5, return_when=asyncio.FIRST_COMPLETED
            )
            # the server reports a violation before anything it sends later on that connection
            if violations.seen("publish", subject, since):
                return "denied", f"{tried} was refused by the server with a permissions violation."
            if not request.done():
                return (
                    "unknown",
                    f"{tried} got no answer and no permissions violation in {timeout_s:g}s.",
                )
            exc = request.exception()
            if isinstance(exc, TimeoutError):  # nats-py's own timeout is one too
                return "unknown", f"{tried} got no answer and no permissions violation in {timeout_s:g}s."
            if isinstance(exc, NoRespondersError):
                return (
                    "allowed",
                    f"{tried} went through without a permissions violation (no stream captures it).",
                )
            if exc is not None:
                said = str(exc) or type(exc).__name__
                return "unknown", f"{tried} failed without a permissions violation ({said})."
            try:
                ack = msgspec.json.decode(request.result().data, type=_PubAck)
            except msgspec.DecodeError:
                return "allowed", f"{tried} got an answer that is not a JetStream acknowledgement."
            if ack.error is not None:
                code = ack.error.get("err_code")
                if code == WRONG_LAST_SEQUENCE:
                    return (
                        "allowed",
                        f"{tried} reached stream {ack.stream or '?'}, which refused it only for the "
                        "expected sequence (nothing was stored).",
                    )
                return "allowed", f"{tried} reached stream {ack.stream or '?'}, which answered {ack.error}."
            return (
                "allowed",
                f"{tried} was stored by stream {ack.stream} as message {ack.seq} "
                "(the stream ignored the expected-sequence header).",
            )
        finally:
            for task in (request, refused):
                task.cancel()
            await asyncio.gather(request, refused, return_exceptions=True)


async def check_subscribe(
    nc: NATS, violations: Violations, subject: str, *, timeout_s: float = SUBSCRIBE_WAIT_S
) -> tuple[Verdict, str]:
    """Subscribe to ``subject`` for ``timeout_s``: ``denied`` on a permissions violation,
    ``allowed`` when the server confirmed the subscription (a ping round trip after it)
    and no violation came; unsubscribed afterwards."""
    tried = f"A subscription to {subject}"
    since = violations.mark()
    with violations.expecting("subscription", subject):
        started = time.monotonic()
        try:
            sub = await nc.subscribe(subject)
        except Exception as exc:  # noqa: BLE001 - the client refused to send it
            return "unknown", f"{tried} could not be sent ({exc or type(exc).__name__})."
        try:
            confirmed = True
            try:
                # twice: nats-py writes a flush's PING ahead of the commands still pending
                # (the SUB), so only the second round trip surely follows the SUB
                for _ in range(2):
                    await nc.flush(timeout=max(1, round(timeout_s)))
            except Exception:  # noqa: BLE001 - no round trip: no confirmation
                confirmed = False
            left = timeout_s - (time.monotonic() - started)
            if await violations.wait("subscription", subject, max(0.05, left), since):
                return "denied", f"{tried} was refused by the server with a permissions violation."
            if not confirmed:
                return (
                    "unknown",
                    f"{tried} got neither a confirmation nor a permissions violation within {timeout_s:g}s.",
                )
            return (
                "allowed",
                f"{tried} was accepted: the server answered a ping after it and sent no permissions "
                f"violation within {timeout_s:g}s (unsubscribed since).",
            )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def nats_checks(nc: NATS, violations: Violations) -> Checks:
    """The four NATS checks, at once, against a fresh random op id."""
    other = f"isolation-{secrets.token_hex(6)}"
    names_and_checks = (
        ("publish_other_op", check_publish(nc, violations, op_subject(other, "result"))),
        ("publish_job", check_publish(nc, violations, job_subject("probe"))),
        ("write_op_record", check_publish(nc, violations, f"$KV.{OPS_BUCKET}.{other}")),
        ("hear_other_op", check_subscribe(nc, violations, op_subject(other, "cancel"))),
    )
    results = await asyncio.gather(*(check for _, check in names_and_checks))
    return {name: result for (name, _), result in zip(names_and_checks, results, strict=True)}


# --- the network check -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One line of /proc/net/route."""

    iface: str
    destination: str
    gateway: str
    prefix: int


def _hex_ip(value: str) -> str:
    # /proc/net/route prints addresses as host-order 32-bit hex
    return socket.inet_ntoa(struct.pack("=I", int(value, 16)))


def parse_routes(text: str) -> list[Route]:
    """The IPv4 routes of a /proc/net/route text."""
    routes: list[Route] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            mask = ipaddress.IPv4Address(_hex_ip(fields[7]))
            prefix = bin(int(mask)).count("1")
            routes.append(Route(fields[0], _hex_ip(fields[1]), _hex_ip(fields[2]), prefix))
        except (ValueError, struct.error):
            continue
    return routes


@dataclass(frozen=True, slots=True)
class Network:
    """Where this container sits: its own address, its subnet, its gateway."""

    own: str
    prefix: int
    gateway: str | None
    assumed_prefix: bool = False

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.own}/{self.prefix}", strict=False)


def candidate_addresses(
    own: str, prefix: int, gateway: str | None, *, limit: int = MAX_ADDRESSES, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Other addresses of ``own``'s subnet where a neighbouring container may sit: the
    first ones of the subnet (bridges hand addresses out in order after the gateway),
    then the ones around ``own``; at most ``limit``, never ``own``, the gateway, the
    network or broadcast address, or anything in ``exclude``."""
    net = ipaddress.IPv4Network(f"{own}/{prefix}", strict=False)
    me = ipaddress.IPv4Address(own)
    if net.num_addresses <= 2:  # /31 and /32: no neighbour shares it
        return []
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    skip = {int(me), *(int(ipaddress.IPv4Address(a)) for a in exclude)}
    if gateway:
        skip.add(int(ipaddress.IPv4Address(gateway)))
    picked: dict[int, None] = {}  # ordered, unique

    def take(numbers: Iterator[int], budget: int) -> None:
        for number in numbers:
            if len(picked) >= budget:
                return
            if first <= number <= last and number not in skip:
                picked.setdefault(number, None)

    def around() -> Iterator[int]:
        for step in range(1, last - first + 2):
            if int(me) + step > last and int(me) - step < first:
                return
            yield int(me) + step
            yield int(me) - step

    take(iter(range(first, last + 1)), limit // 2)
    take(around(), limit)
    take(iter(range(first, last + 1)), limit)  # a small subnet: whatever is left
    return [str(ipaddress.IPv4Address(number)) for number in picked]


def nats_endpoint(nats_url: str) -> tuple[str, int]:
    """The host and port of the first server in ``nats_url`` ("" when there is none)."""
    first = nats_url.split(",")[0].strip()
    if not first:
        return "", DEFAULT_NATS_PORT
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    try:
        port = parts.port or DEFAULT_NATS_PORT
    except ValueError:
        port = DEFAULT_NATS_PORT
    return parts.hostname or "", port


def _source_address(towards: str) -> str | None:
    """The local address the kernel picks to reach ``towards`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect((towards, 9))
            return str(udp.getsockname()[0])
        except OSError:
            return None


def find_network(host_ips: tuple[str, ...], routes: list[Route]) -> Network | str:
    """This container's network from its routes; a sentence saying why not otherwise.
    ``host_ips``: the NATS host's addresses (the way out that matters), if any."""
    defaults = [r for r in routes if r.prefix == 0 and r.gateway != "0.0.0.0"]
    gateway = defaults[0].gateway if defaults else None
    own = None
    for target in (*host_ips, *([gateway] if gateway else [])):
        own = _source_address(target)
        if own and not ipaddress.IPv4Address(own).is_loopback:
            break
        own = None
    if own is None:
        return "no address of its own towards the NATS host or a default gateway"
    me = ipaddress.IPv4Address(own)
    links = [
        r
        for r in routes
        if r.gateway == "0.0.0.0"
        and r.prefix > 0
        and me in ipaddress.IPv4Network(f"{r.destination}/{r.prefix}")
    ]
    if not links:
        return Network(own, 24, gateway, assumed_prefix=True)
    link = max(links, key=lambda r: r.prefix)
    via = [r.gateway for r in defaults if r.iface == link.iface]
    return Network(own, link.prefix, via[0] if via else gateway)


async def _knock(address: str, port: int, timeout_s: float) -> str:
    """``accepted`` / ``refused`` (something answered), else why not."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout_s)
        return "accepted"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "error")
    finally:
        sock.close()


async def probe_addresses(
    addresses: list[str], port: int, timeout_s: float = CONNECT_WAIT_S
) -> dict[str, str]:
    """A TCP connect to each address at once: address -> ``accepted`` | ``refused`` |
    why it did not answer."""
    outcomes = await asyncio.gather(*(_knock(a, port, timeout_s) for a in addresses))
    return dict(zip(addresses, outcomes, strict=True))


ANSWERED = ("accepted", "refused")


def judge_reach(outcomes: dict[str, str], where: str, port: int, timeout_s: float) -> tuple[Verdict, str]:
    """The verdict of :func:`probe_addresses`' outcomes (``where`` says which addresses)."""
    answered = [f"{a} ({how})" for a, how in outcomes.items() if how in ANSWERED]
    if answered:
        named = ", ".join(answered[:5]) + (f" and {len(answered) - 5} more" if len(answered) > 5 else "")
        return (
            "allowed",
            f"TCP connects to {len(outcomes)} addresses {where} on port {port}: {named} answered.",
        )
    silent = collections.Counter(outcomes.values())
    how = ", ".join(f"{n} {why}" for why, n in silent.most_common())
    return (
        "denied",
        f"TCP connects to {len(outcomes)} addresses {where} on port {port}: none answered "
        f"within {timeout_s:g}s ({how or 'none tried'}).",
    )


async def check_reach(
    nats_url: str,
    *,
    timeout_s: float = CONNECT_WAIT_S,
    limit: int = MAX_ADDRESSES,
    route_file: str = "/proc/net/route",
) -> tuple[Verdict, str]:
    """Whether another container on this container's network answers a TCP connect."""
    host, port = nats_endpoint(nats_url)
    host_ips: tuple[str, ...] = ()
    if host:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET)
            host_ips = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        except OSError:
            host_ips = ()
    try:
        routes = parse_routes(Path(route_file).read_text())
    except OSError as exc:
        return "unknown", f"Could not read the routing table ({exc}), so no neighbour address was tried."
    network = find_network(host_ips, routes)
    if isinstance(network, str):
        return (
            "unknown",
            f"Could not tell this container's network ({network}), so no neighbour address was tried.",
        )
    candidates = candidate_addresses(
        network.own, network.prefix, network.gateway, limit=limit, exclude=host_ips
    )
    subnet = f"{network.subnet}{' (assumed)' if network.assumed_prefix else ''}"
    where = f"of {subnet} around {network.own} (never the gateway {network.gateway or 'none'} or itself)"
    if not candidates:
        return (
            "denied",
            f"{subnet} has no address but this container's own and its gateway's: no neighbour to reach.",
        )
    return judge_reach(await probe_addresses(candidates, port, timeout_s), where, port, timeout_s)


# --- all of them -----------------------------------------------------------------------


async def check_isolation(
    nc: NATS | None,
    violations: Violations | None,
    nats_url: str = "",
    *,
    no_nats_note: str = "no NATS connection (local run)",
    deadline_s: float = TOTAL_DEADLINE_S,
) -> Checks:
    """Every check, at once, within ``deadline_s``. Without a connection (or without a
    violations hook on it) the NATS checks are ``unknown``; the network check runs anyway."""

    async def network() -> Checks:
        return {"reach_container": await check_reach(nats_url)}

    if nc is not None and violations is None:
        no_nats_note = "this connection records no permissions violations, so no refusal can be seen"
    checks: Checks = {name: ("unknown", no_nats_note) for name in NATS_CHECKS}
    parts: list[tuple[tuple[str, ...], asyncio.Future[Checks]]] = [
        (("reach_container",), asyncio.ensure_future(network()))
    ]
    if nc is not None and violations is not None:
        parts.append((NATS_CHECKS, asyncio.ensure_future(nats_checks(nc, violations))))
    await asyncio.wait([task for _, task in parts], timeout=deadline_s)
    for names, task in parts:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            checks.update({n: ("unknown", f"no outcome within the {deadline_s:g}s deadline") for n in names})
        elif task.exception() is not None:
            said = f"the check itself failed ({task.exception()!r})"
            checks.update({n: ("unknown", said) for n in names})
        else:
            checks.update(task.result())
    return {name: checks[name] for name in CHECKS}


def check_isolation_here(nats_url: str = "") -> Checks:
    """:func:`check_isolation` without a NATS connection, from any thread (a local run)."""

    def run() -> Checks:
        return asyncio.run(check_isolation(None, None, nats_url))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # called from inside an event loop (a test): run it on a thread of its own
    result: list[Checks] = []
    thread = threading.Thread(target=lambda: result.append(run()), name="isolation")
    thread.start()
    thread.join(TOTAL_DEADLINE_S + 5)
    return result[0] if result else {name: ("unknown", "no outcome within the deadline") for name in CHECKS}


def as_report(checks: Checks) -> dict[str, dict[str, str]]:
    """``{"isolation": name -> verdict, "isolation_notes": name -> note}``."""
    return {
        "isolation": {name: verdict for name, (verdict, _) in checks.items()},
        "isolation_notes": {name: note for name, (_, note) in checks.items()},
    }
