"""``ktrdr-run hosts add NAME URL``: check that an engine answers, then append it to the
config file (text appended, the rest untouched, the result loaded strictly before it
replaces the file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import msgspec

from discovery.base import DiscoveryError
from discovery.config import redact_url
from discovery.docker_engines import DockerEngineProvider
from dispatcher.config import Config, load_config
from dispatcher.errors import ConfigError
from ktrdr_run.cli_hosts import EXIT_OK, EXIT_UNREACHABLE, capacity_text, config_path, discovery_of
from ktrdr_run.cli_submit import UsageError


def parse_gpu(text: str) -> dict[str, Any]:
    """``--gpu INDEX[:MODEL[:MEMORY_GB]]`` as a ``gpus`` entry (a model may hold ':')."""
    parts = text.split(":")
    index, model, memory = parts[0], ":".join(parts[1:-1] if len(parts) > 2 else parts[1:]), ""
    if len(parts) > 2:
        memory = parts[-1]
    problem = f"--gpu {text!r}: expected INDEX:MODEL:MEMORY_GB (e.g. 0:H100:80)"
    if not index.isdigit():
        raise UsageError(f"{problem}; {index!r} is not a GPU index (0, 1, ...)")
    gpu: dict[str, Any] = {"index": int(index), "model": model}
    if memory:
        try:
            gpu["memory_gb"] = float(memory)
        except ValueError:
            raise UsageError(f"{problem}; {memory!r} is not a number of GB") from None
        if not gpu["memory_gb"] >= 0:
            raise UsageError(f"{problem}; memory must be 0 or more GB")
    return gpu


def _toml(value: Any) -> str:
    """``value`` as a TOML value (strings as basic strings; ``${`` kept literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        # JSON's string escapes are TOML's; "${" is escaped so load_config leaves it alone
        return json.dumps(value).replace("${", "\\u0024{")
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def host_entry_toml(section: str, entry: dict[str, Any]) -> str:
    """The ``[[section]]`` table of one host, as text to append to a config file."""
    lines = [f"[[{section}]]"] + [f"{key} = {_toml(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def _load_for_edit(path: Path) -> Config:
    """The config in ``path`` as it is now (defaults when the file does not exist yet)."""
    try:
        # os.devnull: an empty file, so that load_config fills in the defaults (state_dir)
        return load_config(path if path.exists() else Path(os.devnull))
    except ConfigError as exc:
        raise ConfigError(f"{exc}; fix the file before adding a host to it") from None


def _tls_files(args: argparse.Namespace, config: Config, notes: list[str]) -> dict[str, str]:
    """The TLS files for the entry: the ones given, else those of ``ktrdr-run certs``."""
    from discovery.certs import DockerCa

    given = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    if any(given.values()):
        files = {k: v for k, v in given.items() if v}
        for key, value in files.items():
            if not Path(value).expanduser().is_file():
                raise UsageError(f"--{key.replace('_', '-')} {value}: no such file")
        return {k: str(Path(v).expanduser().absolute()) for k, v in files.items()}
    if not args.url.startswith("tcp://"):
        return {}
    ca = DockerCa(config.state_path())
    tls = ca.client_files()
    ours = {"tls_ca": tls["tls_ca"], "tls_cert": tls["tls_cert"], "tls_key": tls["tls_key"]}
    if all(Path(p).is_file() for p in ours.values()):
        notes.append(f"using the client certificate of `ktrdr-run certs` ({ca.root})")
        return ours
    raise UsageError(
        f"URL {args.url!r} is a tcp:// engine: it needs TLS files. Give --tls-ca, --tls-cert and "
        f"--tls-key, or run `ktrdr-run certs init` (and `ktrdr-run certs issue` for the host) so that "
        f"{ca.root} holds them"
    )


def _write_validated(path: Path, text: bytes, name: str, section: str, wanted: Any) -> None:
    """Write ``text`` to ``path`` atomically, after checking that it loads strictly and
    holds ``wanted`` under ``section``; otherwise leave ``path`` as it was."""
    import tempfile

    real = path.resolve()
    mode = stat.S_IMODE(real.stat().st_mode) if real.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".partial", dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            loaded = discovery_of(load_config(Path(tmp)))
        except ConfigError as exc:
            message = str(exc).replace(tmp, str(path))
            raise UsageError(
                f"{path} would not load with this host added, so it is unchanged: {message}"
            ) from None
        entries = loaded.gpu_hosts if section.endswith("gpu_hosts") else loaded.engines
        if [e for e in entries if e.name == name] != [wanted]:
            raise UsageError(f"{path} would not hold {name!r} as given, so it is unchanged")
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def cmd_hosts_add(args: argparse.Namespace, config: Config | None = None) -> int:
    """Check that a Docker engine answers, then append it to the config file
    (``[[discovery.engines]]``, or ``[[discovery.gpu_hosts]]`` with ``--gpu``).

    Exit codes: 0 added; 2 bad arguments, a name already configured, or a file that
    would not load; 3 the engine does not answer. The file is changed only on 0, and only
    by appending text: everything in it stays as it was.
    """
    from discovery.config import EngineConfig, StaticGpuHost

    path = config_path(args)
    as_json = bool(getattr(args, "json", False))
    notes: list[str] = []
    if not path.exists() and not path.resolve().parent.is_dir():
        raise UsageError(f"config file {path}: its directory does not exist")
    base = _load_for_edit(path)
    disc = discovery_of(base)
    taken = {e.name: "discovery.engines" for e in disc.engines} | {
        g.name: "discovery.gpu_hosts" for g in disc.gpu_hosts
    }
    if args.name in taken:
        raise UsageError(
            f"NAME {args.name!r} is already configured in {path} ([[{taken[args.name]}]]): "
            "choose another name"
        )
    gpus = [parse_gpu(g) for g in args.gpu or []]
    section = "discovery.gpu_hosts" if gpus else "discovery.engines"
    entry: dict[str, Any] = {"name": args.name, "url": args.url, **_tls_files(args, base, notes)}
    if args.nats_url:
        entry["nats_url"] = args.nats_url
    if gpus:
        entry["gpus"] = gpus
    kind: type[EngineConfig] = StaticGpuHost if gpus else EngineConfig
    try:
        wanted = msgspec.convert(entry, kind)
    except msgspec.ValidationError as exc:
        raise UsageError(f"cannot add {args.name!r}: {exc}") from None
    probe = msgspec.structs.replace(wanted, timeout_s=float(args.timeout_s))
    where = DockerEngineProvider.endpoint(probe).describe()
    try:
        host = await asyncio.to_thread(DockerEngineProvider([]).describe, probe)
    except DiscoveryError as exc:
        message = f"{exc}; {path} is unchanged"
        if as_json:
            print(
                json.dumps({"added": False, "name": args.name, "url": redact_url(args.url), "error": message})
            )
        else:
            print(f"error: {message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if gpus and not host.gpu_runtime:
        notes.append(
            f"{args.name}'s engine lists no nvidia runtime: GPU containers there fail until the NVIDIA "
            "container toolkit is installed (nvidia-ctk runtime configure --runtime=docker); until "
            "then the dispatcher marks it GPU-less at its first GPU op and places GPU work elsewhere"
        )
    block = host_entry_toml(section, entry)
    old = path.read_bytes() if path.exists() else b""  # bytes: kept exactly, line ends too
    separator = b"" if not old else (b"\n" if old.endswith(b"\n") else b"\n\n")
    text = old + separator + f"# added by `ktrdr-run hosts add`\n{block}".encode()
    _write_validated(path, text, args.name, section, wanted)
    if as_json:
        out = {
            "added": True,
            "name": args.name,
            "section": section,
            "config": str(path),
            "url": redact_url(args.url),
            "cpus": host.cpus,
            "memory_bytes": host.memory_bytes,
            "gpu_runtime": host.gpu_runtime,
            "text": block,
            "notes": notes,
        }
        print(json.dumps(out))
        return EXIT_OK
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.name}: {where}: answers: {capacity_text(host)}")
    print(f"appended to {path}:\n{block}", end="")
    print("restart the dispatcher (ktrdr-run dispatcher) to place ops there")
    return EXIT_OK


def add_hosts_add_parser(hosts: argparse.ArgumentParser) -> None:
    """Register ``hosts add`` under the ``hosts`` parser (``hosts`` alone still lists)."""
    hosts_sub = hosts.add_subparsers(dest="hosts_command", required=False, metavar="{add}")
    p = hosts_sub.add_parser(
        "add",
        help="check that a Docker engine answers, then append it to the config file",
        description="Appends a [[discovery.engines]] entry (or [[discovery.gpu_hosts]] with --gpu) "
        "to the config file (--config, $KTRDR_RUN_CONFIG or ./ktrdr-run.toml; created if missing), "
        "leaving the rest of the file as it is. A tcp:// URL without --tls-* uses the client "
        "certificate of `ktrdr-run certs`.",
    )
    p.add_argument("name", metavar="NAME", help="the host's name (letters, digits, _ . -)")
    p.add_argument(
        "url", metavar="URL", help="its Docker endpoint: tcp://HOST:2376, ssh://USER@HOST or unix:///PATH"
    )
    p.add_argument(
        "--gpu",
        action="append",
        metavar="INDEX:MODEL:MEMORY_GB",
        help="a GPU of the host (repeatable), e.g. 0:H100:80",
    )
    p.add_argument("--tls-ca", metavar="FILE", help="the CA that signed the engine's certificate")
    p.add_argument("--tls-cert", metavar="FILE", help="the dispatcher's client certificate")
    p.add_argument("--tls-key", metavar="FILE", help="its key")
    p.add_argument(
        "--nats-url", metavar="URL", help="the NATS URL containers on that host use (default: derived)"
    )
    p.add_argument(
        "--timeout-s",
        dest="timeout_s",
        type=float,
        default=10.0,
        help="how long to wait for the engine (default 10)",
    )
    p.set_defaults(handler=cmd_hosts_add, own_config=True)
