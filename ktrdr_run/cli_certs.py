"""``ktrdr-run certs init`` and ``ktrdr-run certs issue``: TLS for remote Docker engines.

``init`` creates the CA in ``<state_dir>/certs`` (kept when it exists) and the dispatcher's
client certificate; ``issue HOST`` writes a worker's server certificate bundle (``ca.pem``,
``server-cert.pem``, ``server-key.pem``) for ``dockerd --tlsverify``, creating the CA and
the client certificate first when they are missing (and saying so). Both print the
``tls_ca`` / ``tls_cert`` / ``tls_key`` lines the dispatcher's config takes. See
:mod:`discovery.certs` for the layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from discovery.certs import CertError, DockerCa, fingerprint, server_names
from dispatcher.config import Config
from ktrdr_run.cli_submit import UsageError


def add_certs_parsers(sub: Any) -> None:
    """Register ``certs init`` and ``certs issue``."""
    certs = sub.add_parser("certs", help="TLS certificates for remote Docker engines").add_subparsers(
        dest="certs_command", required=True
    )
    p = certs.add_parser(
        "init",
        help="create the CA in the state directory (kept if it exists) and the client certificate",
    )
    p.set_defaults(handler=cmd_certs_init)
    p = certs.add_parser(
        "issue",
        help="issue a worker's Docker server certificate (ca.pem, server-cert.pem, server-key.pem)",
        description="HOST goes in the certificate as a DNS name (or an IP address, if it is one). "
        "The dispatcher connects to the address in the engine's URL: that name or address must be "
        "among HOST, --ip and --dns. Creates the CA first if there is none.",
    )
    p.add_argument("host", metavar="HOST", help="the worker's host name (or IP address)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an IP address SAN (repeatable)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME", help="a DNS name SAN (repeatable)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="where to write the bundle (default: <state_dir>/certs/hosts/HOST/)",
    )
    p.set_defaults(handler=cmd_certs_issue)


def _config_lines(ca: DockerCa) -> list[str]:
    return [f"{k} = {json.dumps(v)}" for k, v in ca.client_files().items()]


def _prepare(ca: DockerCa, say: Any) -> tuple[bool, bool]:
    """Make sure the CA and the client certificate exist; (CA created, client issued)."""
    created = ca.ensure_ca()
    if created:
        say(f"created a new CA in {ca.root} (ca-key.pem, mode 0600: keep it on this machine only)")
    issued = ca.ensure_client()
    if issued:
        say(f"issued the dispatcher's client certificate {ca.client_cert} (key {ca.client_key.name}, 0600)")
    return created, issued


def _ca_summary(ca: DockerCa) -> dict[str, str]:
    cert, _ = ca.load_ca()
    return {
        "ca": str(ca.ca_cert),
        "ca_key": str(ca.ca_key),
        "ca_fingerprint": fingerprint(cert),
        "ca_not_after": cert.not_valid_after_utc.isoformat(),
    }


def cmd_certs_init(args: argparse.Namespace, config: Config) -> int:
    ca = DockerCa(config.state_path())
    as_json = bool(getattr(args, "json", False))
    lines: list[str] = []
    try:
        with ca.locked():
            created, issued = _prepare(ca, lines.append)
            summary = _ca_summary(ca)
    except (CertError, OSError) as exc:
        raise UsageError(f"certs init: {exc}") from None
    if not created:
        lines.insert(0, f"kept the existing CA in {ca.root} (valid until {summary['ca_not_after'][:10]})")
    if as_json:
        out = {
            "certs_dir": str(ca.root),
            "ca_created": created,
            "client_issued": issued,
            **summary,
            "client_cert": str(ca.client_cert),
            "client_key": str(ca.client_key),
            "config": ca.client_files(),
        }
        print(json.dumps(out))
        return 0
    for line in lines:
        print(line)
    print(f"CA fingerprint (SHA-256): {summary['ca_fingerprint']}")
    print("the dispatcher reaches engines with these certificates: in [[discovery.engines]],")
    print("[[discovery.gpu_hosts]] and [[discovery.proxmox.workers]] set")
    for line in _config_lines(ca):
        print(f"  {line}")
    return 0


def cmd_certs_issue(args: argparse.Namespace, config: Config) -> int:
    ca = DockerCa(config.state_path())
    as_json = bool(getattr(args, "json", False))
    notes: list[str] = []
    try:
        server_names(args.host, tuple(args.ip), tuple(args.dns))  # bad arguments: before any change
        with ca.locked():
            created, client_issued = _prepare(ca, notes.append)
            issued = ca.issue_server(args.host, ips=tuple(args.ip), dns=tuple(args.dns), out=args.output)
    except CertError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"certs issue: {exc}") from None
    if as_json:
        out = {
            "host": issued.host,
            "bundle": str(issued.bundle),
            "files": {"ca": str(issued.ca), "cert": str(issued.cert), "key": str(issued.key)},
            "dns": list(issued.dns),
            "ips": list(issued.ips),
            "not_after": issued.not_after.isoformat(),
            "ca_created": created,
            "client_issued": client_issued,
            "config": ca.client_files(),
        }
        print(json.dumps(out))
        for note in notes:
            print(note, file=sys.stderr)
        return 0
    for note in notes:
        print(note, file=sys.stderr)
    names = [f"DNS {n}" for n in issued.dns] + [f"IP {a}" for a in issued.ips]
    print(
        f"server certificate for {issued.host} ({', '.join(names)}), valid until {issued.not_after:%Y-%m-%d}:"
    )
    print(f"  {issued.ca}")
    print(f"  {issued.cert}")
    print(f"  {issued.key}  (mode 0600)")
    print("copy them to the worker (e.g. /etc/docker/tls/) and run its dockerd with")
    print(
        "  --tlsverify --tlscacert ca.pem --tlscert server-cert.pem --tlskey server-key.pem -H tcp://0.0.0.0:2376"
    )
    print("the dispatcher reaches it with:")
    for line in _config_lines(ca):
        print(f"  {line}")
    return 0
