"""Connecting with a ``.creds`` text inside the container, without the ``nkeys`` package.

nats-py's ``user_credentials`` imports ``nkeys``, which ships no wheel (and the runner
image installs wheels only). A creds file is a user JWT and that user's nkey seed; the
server sends a nonce, and the client proves it holds the seed by signing the nonce with
ed25519. So the runner hands nats-py the JWT and a signing callback built on PyNaCl.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

from nacl.signing import SigningKey

_BLOCK = re.compile(r"-{3,}BEGIN [A-Z ]+-{3,}\s*\n\s*(?P<body>\S+)\s*\n\s*-{3,}END [A-Z ]+-{3,}")
_SEED_PREFIX = 18 << 3  # the first five bits of every nkey seed ("S")
_USER_PREFIX = 20 << 3  # the kind byte of a user key ("U")


class CredsError(ValueError):
    """Not a ``.creds`` text: a user JWT block and a user seed block."""


@dataclass(frozen=True, slots=True)
class UserCreds:
    """A user JWT and the raw ed25519 seed of that user."""

    jwt: str
    seed: bytes

    def jwt_cb(self) -> Callable[[], bytearray]:
        """nats-py's ``user_jwt_cb``."""
        return lambda: bytearray(self.jwt.encode())

    def signature_cb(self) -> Callable[[str], bytes]:
        """nats-py's ``signature_cb``: the nonce signed with the seed, base64."""
        key = SigningKey(self.seed)
        return lambda nonce: base64.b64encode(key.sign(nonce.encode()).signature)


def parse_creds(text: str) -> UserCreds:
    """The JWT and seed of a ``.creds`` text; CredsError says what is missing."""
    blocks = [m.group("body") for m in _BLOCK.finditer(text)]
    if len(blocks) < 2:
        raise CredsError("expected a JWT block and a seed block")
    jwt, seed_text = blocks[0], blocks[1]
    try:
        raw = base64.b32decode(seed_text + "=" * (-len(seed_text) % 8))
    except ValueError:
        raise CredsError("the seed block is not base32") from None
    # 2 prefix bytes (seed marker + key kind), 32 bytes of seed, 2 bytes of CRC16
    if len(raw) != 36 or raw[0] & 0xF8 != _SEED_PREFIX:
        raise CredsError("the seed block is not an nkey seed")
    if ((raw[0] & 0x07) << 5 | raw[1] >> 3) != _USER_PREFIX:
        raise CredsError("the seed is not a user's")
    return UserCreds(jwt=jwt, seed=raw[2:34])
