"""The NATS trust chain of one ktrdr-run deployment, kept in the state directory.

On first use an operator, a system account, the ``KTRDR`` account and that account's
signing key are generated and written to ``<state_dir>/nats-auth/authority.json`` (mode
0600, in a 0700 directory). From them come:

- the server configuration (:meth:`Authority.server_config`): operator mode with an
  in-memory resolver preloaded with both accounts, so no account server is needed; the
  same trust for every node of a cluster (``cluster_configs``);
- credentials (:meth:`Authority.mint`): a user JWT signed by the account's signing key,
  with a role's permissions (:mod:`dispatcher.roles`) and an optional expiry, as a
  ``.creds`` file's text. The dispatcher mints a runner's per op; ``ktrdr-run creds
  issue`` mints people's.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from dispatcher.natsjwt import CredentialError, Key, account_jwt, creds_text, operator_jwt, user_jwt
from dispatcher.roles import Role, permissions

ACCOUNT_NAME = "KTRDR"
AUTH_DIR = "nats-auth"
AUTHORITY_FILE = "authority.json"


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(path.suffix + ".partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(path.with_suffix(path.suffix + ".partial"), path)
    os.chmod(path, 0o600)
    return path


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node of a JetStream cluster: its name, how the other nodes reach it, where it
    listens, and its store."""

    name: str
    #: The host name or address the other nodes route to.
    route_host: str
    store_dir: str = "/var/lib/nats"
    listen_host: str = "0.0.0.0"
    client_port: int = 4222
    cluster_listen_host: str = "0.0.0.0"
    cluster_port: int = 6222
    #: Monitoring (``/healthz``, ``/jsz``); 0 = off.
    http_port: int = 8222
    monitor_host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Authority:
    """The operator, the accounts and the account's signing key."""

    operator: Key
    system: Key
    account: Key
    signer: Key

    @classmethod
    def generate(cls) -> Authority:
        """A fresh trust chain."""
        return cls(
            operator=Key.new("operator"),
            system=Key.new("account"),
            account=Key.new("account"),
            signer=Key.new("account"),
        )

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Authority:
        """The deployment's trust chain, generated and stored on first use."""
        path = state_dir / AUTH_DIR / AUTHORITY_FILE
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        authority = cls.generate()
        seeds = {
            "operator": authority.operator.seed,
            "system": authority.system.seed,
            "account": authority.account.seed,
            "signer": authority.signer.seed,
        }
        write_secret(path, json.dumps(seeds, indent=2) + "\n")
        return authority

    @classmethod
    def find(cls, state_dir: Path) -> Authority | None:
        """The deployment's trust chain if this state directory holds one (never creates)."""
        path = state_dir / AUTH_DIR / AUTHORITY_FILE
        return cls.load(path) if path.exists() else None

    @classmethod
    def load(cls, path: Path) -> Authority:
        """Read a stored trust chain; CredentialError says what is wrong with the file."""
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise CredentialError(f"{path} is readable by others (mode {oct(mode)}); run: chmod 600 {path}")
        try:
            seeds = json.loads(path.read_text())
            return cls(
                **{name: Key.from_seed(seeds[name]) for name in ("operator", "system", "account", "signer")}
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialError(f"{path} is not a ktrdr-run authority file ({exc})") from None

    # -- the server side --------------------------------------------------------------

    def trust_block(self) -> str:
        """The operator-mode part of a nats-server configuration."""
        system_jwt = account_jwt(self.operator, self.system.public, "SYS", jetstream=False)
        ktrdr_jwt = account_jwt(
            self.operator, self.account.public, ACCOUNT_NAME, signing_keys=[self.signer.public]
        )
        return (
            # a client's CONNECT line carries its JWT, and a role's permissions make it
            # longer than the default limit (4 KiB)
            "max_control_line: 32768\n"
            f"operator: {operator_jwt(self.operator, 'ktrdr-run', self.system.public)}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system.public}: {system_jwt}\n"
            f"  {self.account.public}: {ktrdr_jwt}\n"
            "}\n"
        )

    def server_config(
        self, *, host: str = "127.0.0.1", port: int = 4222, store_dir: str, sync_always: bool = False
    ) -> str:
        """A single-server configuration: where it listens, JetStream, and the trust."""
        sync = "  sync_interval: always\n" if sync_always else ""
        return (
            f'listen: {host}:{port}\njetstream {{\n  store_dir: "{store_dir}"\n{sync}}}\n{self.trust_block()}'
        )

    def cluster_configs(self, nodes: int, *, hosts: list[str] | None = None, store_dir: str) -> list[str]:
        """One configuration per node of a JetStream cluster, each node on its own machine:
        clients on port 4222, routes on 6222, monitoring on 127.0.0.1:8222."""
        names = hosts or [f"ktrdr-nats-{i + 1}" for i in range(nodes)]
        return self.cluster_node_configs(
            [ClusterNode(name=name, route_host=name, store_dir=store_dir) for name in names]
        )

    def cluster_node_configs(self, nodes: list[ClusterNode], *, cluster_name: str = "ktrdr") -> list[str]:
        """One configuration per node of ``nodes``, in their order: every node routes to
        every other, JetStream with ``sync_interval: always``, the same trust.

        Nodes do not advertise their client URLs: clients use the list of URLs they are
        given (``[nats] url``), never addresses a node guessed for itself (with 0.0.0.0
        that is every interface, some unreachable from where a client runs).
        """
        if len({node.name for node in nodes}) != len(nodes):
            raise ValueError(f"cluster node names must differ: {[node.name for node in nodes]}")
        routes = ", ".join(f"nats://{node.route_host}:{node.cluster_port}" for node in nodes)
        trust = self.trust_block()
        configs = []
        for node in nodes:
            http = f"http: {node.monitor_host}:{node.http_port}\n" if node.http_port else ""
            configs.append(
                f"server_name: {node.name}\n"
                f"listen: {node.listen_host}:{node.client_port}\n"
                f"{http}"
                # an acknowledged write is on disk on a majority of nodes: without it, one
                # that several nodes hold only in the page cache is lost when they all lose
                # power at once (the default flushes every 2 minutes)
                f'jetstream {{\n  store_dir: "{node.store_dir}"\n  sync_interval: always\n}}\n'
                f"cluster {{\n  name: {cluster_name}\n"
                f"  listen: {node.cluster_listen_host}:{node.cluster_port}\n"
                f"  routes: [{routes}]\n  no_advertise: true\n}}\n"
                f"{trust}"
            )
        return configs

    # -- credentials ------------------------------------------------------------------

    def mint(self, role: Role, name: str, *, op_id: str = "", expires_at: float | None = None) -> str:
        """A ``.creds`` file's text for ``role`` (a runner's names its op)."""
        user = Key.new("user")
        token = user_jwt(
            self.signer,
            self.account.public,
            user.public,
            name,
            permissions(role, op_id, name),
            expires_at=expires_at,
            tags=[f"role:{role}"],
        )
        return creds_text(token, user)

    def mint_runner(self, op_id: str, valid_s: float) -> str:
        """A runner's credentials for one op, expiring after ``valid_s`` seconds."""
        return self.mint("runner", f"runner-{op_id}", op_id=op_id, expires_at=time.time() + valid_s)
