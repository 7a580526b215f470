"""How op containers get onto NATS: per-op credentials and where the server answers them.

A dispatcher that holds the deployment's :class:`~dispatcher.authority.Authority` mints
each attempt's runner credentials (that op's subjects only, expiring after the op's
timeout plus grace) and hands them to the container on standard input. The embedded
server listens on loopback only; ``expose`` (a :class:`~dispatcher.forwarder.Forwarder`)
makes it answer on an address containers use too (the runners' network gateway of the
local engine).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dispatcher.authority import Authority
from dispatcher.config import DispatcherConfig

#: Slack on top of a timed op's deadlines (container start, clock skew).
SLACK_S = 60.0


@dataclass(frozen=True, slots=True)
class RunnerAccess:
    """What a dispatcher gives its containers to reach NATS (nothing extra by default:
    a server without authentication)."""

    authority: Authority | None = None
    #: Called with the address (host) of each runner URL the first time it is used.
    expose: Callable[[str], Awaitable[None]] | None = None

    def valid_s(self, timeout_s: float | None, config: DispatcherConfig) -> float:
        """How long an attempt's credentials live: its whole possible life, no longer."""
        if timeout_s is None:
            return config.runner_creds_max_s
        return config.runner_ready_s + timeout_s + config.cancel_grace_s + config.result_deadline_s + SLACK_S

    def credentials(self, op_id: str, timeout_s: float | None, config: DispatcherConfig) -> bytes:
        """A ``.creds`` text for one attempt of ``op_id``; empty without an authority."""
        if self.authority is None:
            return b""
        return self.authority.mint_runner(op_id, self.valid_s(timeout_s, config)).encode()
