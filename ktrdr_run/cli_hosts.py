"""``ktrdr-run config check`` and ``ktrdr-run hosts``.

``config check`` decodes the config strictly, then reaches everything it names (NATS, the
local engine, configured engines, Proxmox clusters and the workers they list, GPU hosts)
with short timeouts and prints what it found. Exit codes: 0 all fine, 2 the config is
invalid, 3 something configured is unreachable. Secrets are never printed: the config is
shown through :func:`discovery.config.redacted` and every ``${VAR}`` value the file
references is scrubbed from the output.

``hosts`` prints the ``ktrdr_hosts`` snapshot the dispatcher publishes; when there is none
it discovers from the config directly and says so. ``hosts add`` is in
:mod:`ktrdr_run.cli_hosts_add`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec
from rich.table import Table
from rich.text import Text

from discovery.base import DiscoveryError, Host
from discovery.config import DiscoveryConfig, redact_url, redacted
from discovery.docker_engines import LABEL_TIMEOUT, DockerEngineProvider, EngineEndpoint, LocalEngineProvider
from discovery.health import HostHealth, HostSnapshot, Inventory, read_snapshot
from discovery.proxmox import ProxmoxProvider
from dispatcher.config import CONFIG_ENV, DEFAULT_CONFIG_NAME, Config, load_config
from dispatcher.embedded import is_local_url
from dispatcher.errors import ConfigError, JetStreamSetupError, NatsUnavailable
from ktrdr_run.render import console_for

HOST_STATE_STYLES = {"available": "green", "unhealthy": "red", "gone": "dim"}
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
GIB = 1024**3
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`(?: - at `(\$[^`]*)`)?")


def discovery_of(config: Config) -> DiscoveryConfig:
    """The ``[discovery]`` section of a config (defaults when the Config has none)."""
    value = getattr(config, "discovery", None)
    return value if isinstance(value, DiscoveryConfig) else DiscoveryConfig()


def config_path(args: argparse.Namespace) -> Path:
    """The config file this command reads (as ``load_config`` chooses it)."""
    given = getattr(args, "config", None)
    return Path(given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def _struct_at(path: str) -> type | None:
    """The Struct type at a msgspec error path like ``$.discovery.proxmox[0]``."""
    current: Any = Config
    for token in re.findall(r"\.([A-Za-z0-9_\-]+)|\[\d+\]", path):
        if token:  # a field name
            if not (isinstance(current, type) and issubclass(current, msgspec.Struct)):
                return None
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(current)}
            if token not in fields:
                return None
            current = fields[token]
        else:  # a list index
            args = typing.get_args(current)
            if not args:
                return None
            current = args[0]
    return current if isinstance(current, type) and issubclass(current, msgspec.Struct) else None


def explain_config_error(message: str) -> str:
    """The config error, with the likely intended key for an unknown one."""
    match = _UNKNOWN_FIELD.search(message)
    if not match:
        return message
    unknown, path = match.groups()
    struct = _struct_at(path or "$")
    if struct is None:
        return message
    known = [f.encode_name for f in msgspec.structs.fields(struct)]
    close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    if close:
        return f"{message} (did you mean `{close[0]}`?)"
    return f"{message} (valid keys there: {', '.join(known)})"


def _secrets_of(path: Path) -> list[str]:
    """Values of every ``${VAR}`` the config file references: never to be printed."""
    try:
        text = path.read_text()
    except OSError:
        return []
    values = [os.environ.get(name, "") for name in set(_ENV_REF.findall(text))]
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


@dataclass
class Report:
    """What ``config check`` prints, scrubbed of secrets."""

    secrets: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def say(self, text: str) -> None:
        self.lines.append(self.scrub(text))

    def problem(self, text: str) -> None:
        self.problems.append(self.scrub(text))


def capacity_text(host: Host) -> str:
    gpus = f", {len(host.gpus)} GPU(s)" if host.gpus else ""
    runtime = ", nvidia runtime" if host.gpu_runtime else ""
    return f"{host.cpus:g} cpus, {host.memory_bytes / GIB:.1f} GiB{gpus}{runtime}"


async def _check_nats(config: Config, report: Report, timeout_s: float) -> None:
    url = config.nats.url
    first = url.split(",")[0].strip()  # a cluster's list: its first node
    parsed = urlparse(first if "://" in first else f"nats://{first}")
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout_s
        )
        writer.close()
        state = "answering"
    except (OSError, TimeoutError) as exc:
        if config.nats.embedded and "," not in url and is_local_url(url):
            state = "not running (an embedded nats-server will be started when needed)"
        else:
            state = f"UNREACHABLE ({exc or type(exc).__name__})"
            report.problem(f"nats {redact_url(url)}: nothing answers and embedded NATS is off for this URL")
    report.say(f"nats: {redact_url(url)}: {state}")
    report.data["nats"] = {"url": redact_url(url), "state": state}


async def _check_local(config: Config, report: Report, timeout_s: float) -> None:
    url = config.docker.url
    try:
        hosts = await asyncio.to_thread(LocalEngineProvider(url, timeout_s=timeout_s).discover)
        line = f"ok: {hosts[0].name}, {capacity_text(hosts[0])}"
    except DiscoveryError as exc:
        line = f"UNREACHABLE: {exc}"
        report.problem(f"local docker engine: {exc}")
    report.say(f"docker (local): {redact_url(url) or 'default socket'}: {line}")
    report.data["docker"] = {"url": redact_url(url), "result": line}


async def _check_engines(disc: DiscoveryConfig, report: Report, timeout_s: float) -> None:
    if not disc.engines:
        report.say("engines: none configured")
        return
    report.say(f"engines: {len(disc.engines)}")
    provider = DockerEngineProvider([])
    cfgs = [msgspec.structs.replace(e, timeout_s=min(e.timeout_s, timeout_s)) for e in disc.engines]
    results = await asyncio.gather(
        *(asyncio.to_thread(provider.describe, c) for c in cfgs), return_exceptions=True
    )
    for cfg, result in zip(cfgs, results, strict=True):
        where = DockerEngineProvider.endpoint(cfg).describe()
        if isinstance(result, Host):
            report.say(f"  {cfg.name}: {where}: ok: {capacity_text(result)}")
        else:
            report.say(f"  {cfg.name}: {where}: UNREACHABLE: {result}")
            report.problem(str(result))


async def _check_hosts_engines(hosts: list[Host], report: Report, indent: str, timeout_s: float) -> None:
    """Reach each discovered host's engine once (at most ``timeout_s`` per request)."""
    hosts = [
        dataclasses.replace(
            h, labels={**h.labels, LABEL_TIMEOUT: f"{min(EngineEndpoint.of(h).timeout_s, timeout_s):g}"}
        )
        for h in hosts
    ]
    health = HostHealth(failure_threshold=1)
    try:
        oks = await asyncio.gather(*(health.check(h) for h in hosts))
        for host, ok in zip(hosts, oks, strict=True):
            status = health.status(host.name)
            where = EngineEndpoint.of(host).describe()
            if ok:
                report.say(f"{indent}{host.name}: {where}: ok: {capacity_text(host)}")
            else:
                error = status.error if status else "no answer"
                report.say(f"{indent}{host.name}: {where}: ENGINE UNREACHABLE: {error}")
                report.problem(error)
    finally:
        health.close()


async def _check_proxmox(disc: DiscoveryConfig, report: Report, timeout_s: float) -> None:
    if not disc.proxmox:
        report.say("proxmox: none configured")
        return
    report.say(f"proxmox: {len(disc.proxmox)} cluster(s)")
    for cfg in disc.proxmox:
        cfg = msgspec.structs.replace(cfg, timeout_s=min(cfg.timeout_s, timeout_s))
        provider = ProxmoxProvider(cfg)
        tags = ", ".join(w.tag for w in cfg.workers)
        head = (
            f"  {cfg.name}: https://{cfg.host}:{cfg.port} as {cfg.user}!{cfg.token_name} "
            f"(token ***), tags {tags}"
        )
        try:
            hosts = await asyncio.to_thread(provider.discover)
        except DiscoveryError as exc:
            report.say(f"{head}: UNREACHABLE: {exc}")
            report.problem(str(exc))
            continue
        report.say(f"{head}: ok: {len(hosts)} worker(s) found")
        for warning in provider.warnings:
            report.say(f"    warning: {warning}")
        await _check_hosts_engines(hosts, report, "    ", timeout_s)


async def _check_gpu_hosts(disc: DiscoveryConfig, report: Report, timeout_s: float) -> None:
    if not disc.gpu_hosts:
        report.say("gpu hosts: none configured")
        return
    from discovery.static import StaticGpuProvider

    report.say(f"gpu hosts: {len(disc.gpu_hosts)}")
    cfgs = [msgspec.structs.replace(g, timeout_s=min(g.timeout_s, timeout_s)) for g in disc.gpu_hosts]
    hosts = StaticGpuProvider(cfgs).discover()
    for host in hosts:
        gpus = ", ".join(f"#{g.index} {g.model or '?'} {g.memory_gb:g} GB".strip() for g in host.gpus)
        report.say(f"  {host.name}: GPUs {gpus}")
    await _check_hosts_engines(hosts, report, "    ", timeout_s)


async def cmd_config_check(args: argparse.Namespace, config: Config | None = None) -> int:
    """Validate the config and reach everything it names; print what was found.

    With ``config`` None the file is loaded here (so a bad file is reported by this
    command, with a hint for a mistyped key). Returns 0, 2 (invalid) or 3 (unreachable).
    """
    path = config_path(args)
    report = Report(secrets=_secrets_of(path))
    as_json = bool(getattr(args, "json", False))
    timeout_s = float(getattr(args, "timeout_s", 5.0) or 5.0)
    if config is None:
        try:
            config = load_config(getattr(args, "config", None))
        except ConfigError as exc:
            message = report.scrub(explain_config_error(str(exc)))
            if as_json:
                print(json.dumps({"ok": False, "config": str(path), "error": message}))
            else:
                print(f"config error: {message}", file=sys.stderr)
            return EXIT_CONFIG
    disc = discovery_of(config)
    source = str(path) if path.exists() else f"{path} (not found: built-in defaults)"
    report.say(f"config: {source}")
    await _check_nats(config, report, timeout_s)
    await _check_local(config, report, timeout_s)
    await _check_engines(disc, report, timeout_s)
    await _check_proxmox(disc, report, timeout_s)
    await _check_gpu_hosts(disc, report, timeout_s)
    if as_json:
        out = {
            "ok": not report.problems,
            "config": source,
            "settings": redacted(config),
            "report": report.lines,
            "problems": report.problems,
        }
        print(report.scrub(json.dumps(out, indent=2)))
    else:
        for line in report.lines:
            print(line)
        if report.problems:
            print(f"\n{len(report.problems)} problem(s):")
            for problem in report.problems:
                print(f"  - {problem}")
        else:
            print("\nall configured hosts answer")
    return EXIT_UNREACHABLE if report.problems else EXIT_OK


# --- hosts -----------------------------------------------------------------------------


def _gpus_cell(snap: HostSnapshot) -> str:
    if not snap.gpus:
        return "-"
    models = sorted(
        {f"{g.model} {g.memory_gb:g}GB" if g.memory_gb else g.model for g in snap.gpus if g.model}
    )
    text = f"{snap.free_gpus}/{len(snap.gpus)}" + (f" {'/'.join(models)}" if models else "")
    return text if snap.gpu_runtime else f"{text} (no runtime)"


def _labels_cell(snap: HostSnapshot) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(snap.tags.items())) or "-"


def print_hosts(snapshots: list[HostSnapshot], out: Callable[[str], None] = print) -> None:
    """The host table: name, source, state, cpus and memory free/total, GPUs, running ops,
    and the host's labels (what ``resources.host_labels`` matches)."""
    width = max([len("HOST")] + [len(s.name) for s in snapshots])
    out(
        f"{'HOST':<{width}}  {'SOURCE':<16} {'STATE':<10} {'CPUS free/total':>15}  "
        f"{'MEM GiB free/total':>18}  {'GPUS free/total':<20} {'OPS':>4}  LABELS"
    )
    for s in snapshots:
        cpus = f"{s.free_cpus:g}/{s.cpus:g}"
        mem = f"{s.free_memory_bytes / GIB:.1f}/{s.memory_bytes / GIB:.1f}"
        out(
            f"{s.name:<{width}}  {s.source[:16]:<16} {s.state:<10} {cpus:>15}  {mem:>18}  "
            f"{_gpus_cell(s):<20} {s.running_ops:>4}  {_labels_cell(s)}"
        )
    for s in snapshots:
        if s.error and s.state != "available":
            out(f"  {s.name}: {s.error}")


def hosts_table(snapshots: list[HostSnapshot]) -> Table:
    """The host table for a terminal: the columns of print_hosts, states coloured."""
    table = Table(header_style="bold", box=None, padding=(0, 1))
    for name in (
        "HOST",
        "SOURCE",
        "STATE",
        "CPUS free/total",
        "MEM GiB free/total",
        "GPUS free/total",
        "OPS",
        "LABELS",
    ):
        table.add_column(
            name, justify="right" if name in ("CPUS free/total", "MEM GiB free/total", "OPS") else "left"
        )
    for s in snapshots:
        table.add_row(
            s.name,
            s.source,
            Text(s.state, style=HOST_STATE_STYLES.get(s.state, "")),
            f"{s.free_cpus:g}/{s.cpus:g}",
            f"{s.free_memory_bytes / GIB:.1f}/{s.memory_bytes / GIB:.1f}",
            _gpus_cell(s),
            str(s.running_ops),
            _labels_cell(s),
        )
    return table


async def discover_snapshots(config: Config) -> tuple[list[HostSnapshot], dict[str, str]]:
    """Discover and check every host of the config once; (snapshots, provider errors)."""
    inventory = Inventory.from_config(
        discovery_of(config), local_url=config.docker.url, local_timeout_s=min(config.docker.timeout_s, 10.0)
    )
    try:
        await inventory.refresh(rediscover=True)
        snaps = sorted(inventory.snapshots(), key=lambda s: s.name)
        return snaps, {k: v for k, v in inventory.provider_errors.items() if v}
    finally:
        inventory.close()


async def cmd_hosts(args: argparse.Namespace, config: Config) -> int:
    """Print the hosts snapshot (``ktrdr_hosts``); discover directly when there is none."""
    from ktrdr_run.session import Session

    note = ""
    snaps: list[HostSnapshot] = []
    if not getattr(args, "discover", False):
        try:
            # read-only: binds to what the dispatcher set up, creates and changes nothing
            async with Session(config, need_dispatcher=False, setup="bind") as session:
                assert session.handles is not None
                snaps = await read_snapshot(session.handles.hosts)
        except NatsUnavailable as exc:
            note = f"NATS is not reachable ({exc}): discovered from the config just now"
        except JetStreamSetupError as exc:
            note = f"the dispatcher has not published a snapshot ({exc}): discovered from the config just now"
    published = bool(snaps)
    errors: dict[str, str] = {}
    if not snaps:
        note = note or (
            "the dispatcher has not published a snapshot (KV ktrdr_hosts is empty): "
            "discovered from the config just now"
        )
        snaps, errors = await discover_snapshots(config)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "published": published,
                    "note": note,
                    "hosts": msgspec.to_builtins(snaps),
                    "provider_errors": errors,
                }
            )
        )
        return EXIT_OK
    if note:
        print(f"note: {note}", file=sys.stderr)
    if snaps:
        console = console_for(sys.stdout)
        if console.is_terminal:
            console.print(hosts_table(snaps))
            for s in snaps:
                if s.error and s.state != "available":
                    console.print(f"  {s.name}: {s.error}", style="red", markup=False)
        else:
            print_hosts(snaps)
    else:
        print("no hosts")
    for provider, error in errors.items():
        print(f"{provider}: {error}", file=sys.stderr)
    return EXIT_OK


def add_hosts_parsers(sub: Any) -> argparse.ArgumentParser:
    """Register ``config check`` and ``hosts`` on the CLI's subparsers; the ``hosts``
    parser, for its subcommands (:mod:`ktrdr_run.cli_hosts_add`).

    ``config check`` sets ``own_config=True``: main() should pass it ``config=None`` so
    the command loads (and reports on) the file itself.
    """
    config_cmd = sub.add_parser("config", help="the configuration file").add_subparsers(
        dest="config_command", required=True
    )
    p = config_cmd.add_parser("check", help="validate the config and reach every host it names")
    p.add_argument(
        "--timeout-s", dest="timeout_s", type=float, default=5.0, help="per-check timeout (default 5)"
    )
    p.set_defaults(handler=cmd_config_check, own_config=True)

    p = sub.add_parser("hosts", help="hosts, their state, capacity, GPUs and running ops")
    p.add_argument("--discover", action="store_true", help="ignore the snapshot: discover and check now")
    p.set_defaults(handler=cmd_hosts)
    return p
