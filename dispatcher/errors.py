"""Errors of the dispatcher package: one root; Docker and NATS errors are translated into
these at the edge, with a message a user can act on."""

from __future__ import annotations


class KtrdrError(Exception):
    """Root of every error the dispatcher, CLI and discovery raise."""


class ConfigError(KtrdrError):
    """The configuration file is missing, malformed or has a bad value."""


class DockerUnavailable(KtrdrError):
    """No Docker engine answers where we looked."""


class NatsUnavailable(KtrdrError):
    """No NATS server answers and none could be started."""


class NatsRefused(KtrdrError):
    """A NATS server answers but refuses ktrdr-run's credentials (or wants some)."""


class JetStreamSetupError(KtrdrError):
    """ktrdr-run's streams or buckets are missing (and this command may not create them),
    or the server refuses a change ``ktrdr-run setup`` asked for."""


class PlacementError(KtrdrError):
    """No host can ever run this op (e.g. it asks more than any host has)."""


class InfrastructureError(KtrdrError):
    """The engine refused or failed to run a container; retryable."""


class EngineUnreachable(InfrastructureError):
    """The engine does not answer (its host may be gone, or only slow)."""


class EngineGone(EngineUnreachable):
    """The engine refuses connections: nothing listens there any more."""


class OpNotFound(KtrdrError):
    """No op record has this id."""

    def __init__(self, op_id: str) -> None:
        self.op_id = op_id
        super().__init__(f"no op with id {op_id!r} (see `ktrdr-run ops list`)")


class OwnershipLost(KtrdrError):
    """Another dispatcher took this op over: the writer must stop touching it."""

    def __init__(self, op_id: str, owner: str, attempt: int) -> None:
        self.op_id = op_id
        self.owner = owner
        self.attempt = attempt
        super().__init__(f"op {op_id} is now owned by {owner or 'nobody'} (attempt {attempt})")
