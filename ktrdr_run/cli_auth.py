"""``ktrdr-run nats config`` and ``ktrdr-run creds issue``: the deployment's NATS trust.

Both read (or, the first time, create) the trust chain in the state directory
(:mod:`dispatcher.authority`). ``nats config`` writes a nats-server configuration in
operator mode, for one server or each node of a cluster, so an operator can run their own
server with the same accounts; ``creds issue`` writes a credentials file for a person's
role, usable by any NATS client (nats-py ``user_credentials=``, ``nats --creds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dispatcher.authority import Authority, write_secret
from dispatcher.config import Config
from dispatcher.roles import PERSON_ROLES
from ktrdr_run.cli_submit import UsageError


def add_auth_parsers(sub: Any) -> None:
    """Register ``nats config`` and ``creds issue``."""
    nats = sub.add_parser("nats", help="the NATS server side").add_subparsers(
        dest="nats_command", required=True
    )
    p = nats.add_parser(
        "config",
        help="write a nats-server config with ktrdr-run's accounts and permissions",
        description="Operator mode with an in-memory resolver: the server needs no account server.",
    )
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="where to write it")
    p.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="N configs for a JetStream cluster (FILE-1.conf ...): one node per machine, clients on "
        "4222, routes on 6222, monitoring on 127.0.0.1:8222, sync_interval always",
    )
    p.add_argument("--host", action="append", metavar="NAME", help="cluster node host names (repeat N times)")
    p.add_argument(
        "--listen", default="127.0.0.1:4222", help="single server: host:port (default 127.0.0.1:4222)"
    )
    p.add_argument(
        "--store-dir", default="/var/lib/nats", help="JetStream store directory (default /var/lib/nats)"
    )
    p.set_defaults(handler=cmd_nats_config)

    creds = sub.add_parser("creds", help="NATS credentials").add_subparsers(
        dest="creds_command", required=True
    )
    p = creds.add_parser("issue", help="write a credentials file for a submitter or an observer")
    p.add_argument("--role", choices=PERSON_ROLES, required=True)
    p.add_argument("--name", required=True, help="who holds it (shown as submitted_by)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    p.add_argument("--expires-in-s", type=float, metavar="S", help="valid for S seconds (default: no expiry)")
    p.set_defaults(handler=cmd_creds_issue)


def cmd_nats_config(args: argparse.Namespace, config: Config) -> int:
    authority = Authority.load_or_create(config.state_path())
    if args.cluster is not None:
        if args.cluster < 3:
            raise UsageError("--cluster: a JetStream cluster needs at least 3 nodes")
        if args.host and len(args.host) != args.cluster:
            raise UsageError(f"--host: give {args.cluster} host names, got {len(args.host)}")
        hosts = args.host or [f"ktrdr-nats-{i + 1}" for i in range(args.cluster)]
        configs = authority.cluster_configs(args.cluster, hosts=hosts, store_dir=args.store_dir)
        stem = args.output.with_suffix("")
        for i, text in enumerate(configs, start=1):
            path = write_secret(stem.with_name(f"{stem.name}-{i}.conf"), text)
            print(path)
        urls = ",".join(f"nats://{host}:4222" for host in hosts)
        print(f'clients: [nats] url = "{urls}"  (streams get 3 replicas on the cluster)', file=sys.stderr)
        return 0
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen {args.listen!r}: expected host:port")
    text = authority.server_config(host=host, port=int(port), store_dir=args.store_dir, sync_always=True)
    print(write_secret(args.output, text))
    return 0


def cmd_creds_issue(args: argparse.Namespace, config: Config) -> int:
    if args.expires_in_s is not None and args.expires_in_s <= 0:
        raise UsageError("--expires-in-s must be above 0")
    authority = Authority.load_or_create(config.state_path())
    expires_at = time.time() + args.expires_in_s if args.expires_in_s else None
    try:
        text = authority.mint(args.role, args.name, expires_at=expires_at)
    except ValueError as exc:
        raise UsageError(f"--name: {exc}") from None
    path = write_secret(args.output, text)
    print(f"{args.role} credentials for {args.name!r} written to {path} (mode 0600)", file=sys.stderr)
    return 0
