"""Placement: which host an op goes to, and what is reserved where.

Reservations here are this dispatcher's own ledger of what it started; capacity comes
from the discovered hosts. Work that does not fit now stays in JetStream (the job
message is nak'ed with a delay), never in dispatcher memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.base import Host
from runner.protocol import Resources


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one op holds on one host."""

    op_id: str
    host: Host
    cpus: float
    memory_bytes: int


def _need(resources: Resources) -> tuple[float, int]:
    """CPUs and memory bytes of resolved resources."""
    return float(resources.cpus or 0.0), int((resources.memory_gb or 0.0) * 1024**3)


class Ledger:
    """Free capacity per host, and the reservations against it."""

    def __init__(self, hosts: list[Host]) -> None:
        self._hosts = {host.name: host for host in hosts}
        self._reservations: dict[str, Reservation] = {}

    @property
    def hosts(self) -> list[Host]:
        """Every known host."""
        return list(self._hosts.values())

    def used(self, host_name: str) -> tuple[float, int]:
        """CPUs and memory bytes reserved on a host."""
        cpus, memory = 0.0, 0
        for res in self._reservations.values():
            if res.host.name == host_name:
                cpus += res.cpus
                memory += res.memory_bytes
        return cpus, memory

    def can_ever_fit(self, resources: Resources) -> bool:
        """Whether some host could run this op when idle."""
        need_cpus, need_memory = _need(resources)
        return any(h.cpus >= need_cpus and h.memory_bytes >= need_memory for h in self._hosts.values())

    def largest_host(self) -> str:
        """A description of the biggest host, for error messages."""
        if not self._hosts:
            return "no hosts"
        big = max(self._hosts.values(), key=lambda h: (h.cpus, h.memory_bytes))
        return f"{big.name}: {big.cpus:g} cpus, {big.memory_bytes / 1024**3:.1f} GiB"

    def reserve(self, op_id: str, resources: Resources) -> Reservation | None:
        """Reserve room for the op on the least-loaded host it fits on, or None."""
        need_cpus, need_memory = _need(resources)
        best: tuple[float, Host] | None = None
        for host in self._hosts.values():
            cpus, memory = self.used(host.name)
            if cpus + need_cpus > host.cpus + 1e-9 or memory + need_memory > host.memory_bytes:
                continue
            load = (cpus + need_cpus) / host.cpus
            if best is None or load < best[0]:
                best = (load, host)
        if best is None:
            return None
        reservation = Reservation(op_id, best[1], need_cpus, need_memory)
        self._reservations[op_id] = reservation
        return reservation

    def adopt(self, op_id: str, resources: Resources, host_name: str = "") -> Reservation:
        """Reserve what an already running op holds (after a restart), fit or not."""
        host = self._hosts.get(host_name) or next(iter(self._hosts.values()))
        need_cpus, need_memory = _need(resources)
        reservation = Reservation(op_id, host, need_cpus, need_memory)
        self._reservations[op_id] = reservation
        return reservation

    def release(self, op_id: str) -> None:
        """Free what the op held."""
        self._reservations.pop(op_id, None)

    def running_on(self, host_name: str) -> int:
        """How many ops hold a reservation on a host."""
        return sum(1 for r in self._reservations.values() if r.host.name == host_name)
