"""NATS decentralised credentials: nkeys, JWTs (operator, account, user) and ``.creds`` files.

The format is NATS's own (jwt v2): ``base64url(header).base64url(claims).base64url(sig)``
with an ed25519 nkey signature over the first two parts, claims carrying ``iss``/``sub``
public keys, ``iat``/``exp`` and a ``nats`` section typed operator, account or user. A
nats-server in operator mode checks the chain operator → account → user (signed by the
account or one of its signing keys) at connect time, and refuses expired users, so the
dispatcher can mint one user per op without touching the server.

Only ``nkeys`` (ed25519 over PyNaCl) is needed; nothing here talks to a server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import nkeys

from dispatcher.errors import KtrdrError

KeyKind = Literal["operator", "account", "user"]
_PREFIX = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
#: Account limits that leave everything to the server's own (JetStream on, unlimited).
OPEN_LIMITS: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class CredentialError(KtrdrError):
    """A key, JWT or creds file that cannot be read or used."""


@dataclass(frozen=True, slots=True)
class Key:
    """An nkey pair: the seed (secret) and its public key."""

    seed: str
    public: str

    @classmethod
    def new(cls, kind: KeyKind) -> Key:
        """A fresh random key of ``kind``."""
        seed = nkeys.encode_seed(os.urandom(32), _PREFIX[kind])
        return cls.from_seed(seed.decode())

    @classmethod
    def from_seed(cls, seed: str) -> Key:
        """The key of an ``S...`` seed; CredentialError when it is not one."""
        try:
            pair = nkeys.from_seed(seed.strip().encode())
        except Exception as exc:  # noqa: BLE001 - nkeys raises several unrelated types
            raise CredentialError(f"not an nkey seed ({type(exc).__name__})") from None
        return cls(seed=seed.strip(), public=pair.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        """The ed25519 signature of ``data``."""
        return bytes(nkeys.from_seed(self.seed.encode()).sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_jwt(
    signer: Key, subject: str, name: str, nats: dict[str, Any], *, expires_at: float | None = None
) -> str:
    """A JWT for ``subject`` (a public key) signed by ``signer``; ``nats`` is the typed
    section (``type``, permissions, limits...). ``expires_at``: Unix seconds."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": signer.public,
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **nats},
    }
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    # the JWT id is the hash of the claims without it, as the Go library makes it
    claims["jti"] = (
        base64.b32encode(hashlib.new("sha512_256", _compact(claims)).digest()).decode().rstrip("=")
    )
    head = _b64(_compact(_HEADER))
    body = _b64(_compact(claims))
    signature = _b64(signer.sign(f"{head}.{body}".encode()))
    return f"{head}.{body}.{signature}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (its signature is not checked here: the server checks it)."""
    try:
        _head, body, _sig = token.strip().split(".")
        claims = json.loads(_unb64(body))
    except ValueError as exc:
        raise CredentialError(f"not a NATS JWT ({exc})") from None
    if not isinstance(claims, dict):
        raise CredentialError("not a NATS JWT (claims are not an object)")
    return claims


def operator_jwt(operator: Key, name: str, system_account: str) -> str:
    """The self-signed operator JWT naming the system account."""
    return encode_jwt(operator, operator.public, name, {"type": "operator", "system_account": system_account})


def account_jwt(
    operator: Key, account: str, name: str, *, signing_keys: list[str] | None = None, jetstream: bool = True
) -> str:
    """An account JWT signed by the operator (JetStream enabled unless ``jetstream`` is
    False, as for the system account)."""
    limits = dict(OPEN_LIMITS)
    if not jetstream:
        for field in ("mem_storage", "disk_storage", "streams", "consumer"):
            limits.pop(field)
    nats: dict[str, Any] = {"type": "account", "limits": limits}
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    return encode_jwt(operator, account, name, nats)


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a user may publish and subscribe to (allow lists; deny wins)."""

    pub_allow: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    #: Whether the user may answer requests sent to it (a service's replies).
    responses: bool = False

    def claims(self) -> dict[str, Any]:
        """The ``pub``/``sub``/``resp`` part of a user JWT."""

        def side(allow: tuple[str, ...], deny: tuple[str, ...]) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {"allow": list(allow)}
            if deny:
                out["deny"] = list(deny)
            return out

        claims: dict[str, Any] = {
            "pub": side(self.pub_allow, self.pub_deny),
            "sub": side(self.sub_allow, self.sub_deny),
        }
        if self.responses:
            claims["resp"] = {"max": 1, "ttl": 0}
        return claims


def user_jwt(
    signer: Key,
    account: str,
    user: str,
    name: str,
    permissions: Permissions,
    *,
    expires_at: float | None = None,
    tags: list[str] | None = None,
) -> str:
    """A user JWT signed by the account's signing key ``signer`` (``account`` names the
    account it belongs to), with ``permissions`` and an optional expiry."""
    nats: dict[str, Any] = {
        "type": "user",
        "issuer_account": account,
        "subs": -1,
        "data": -1,
        "payload": -1,
        **permissions.claims(),
    }
    if tags:
        nats["tags"] = list(tags)
    return encode_jwt(signer, user, name, nats, expires_at=expires_at)


_CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def creds_text(jwt: str, user: Key) -> str:
    """A ``.creds`` file (what ``nats --creds`` and nats-py ``user_credentials=`` read)."""
    return _CREDS.format(jwt=jwt, seed=user.seed)


def read_creds(text: str) -> tuple[str, Key]:
    """The JWT and the user key of a ``.creds`` file's text."""
    blocks = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith(("-----", "------", "*")) and " " not in line.strip()
    ]
    if len(blocks) != 2:
        raise CredentialError("not a NATS .creds file (expected a JWT and a seed)")
    return blocks[0], Key.from_seed(blocks[1])
