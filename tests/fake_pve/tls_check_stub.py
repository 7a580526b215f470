#!/usr/bin/env python3
"""A recording stand-in for deploy-workers.sh's TLS check (``KTRDR_TLS_CHECK``), called
as ``tls_check ADDRESS PORT CA CERT KEY``. It answers as a worker's Docker API would:
success only when a running container has that address, Docker is running in it and
serves the certificate pushed to /etc/docker/certs/server-cert.pem (restarted since the
push), that certificate names the address, the CA given is the one pushed next to it,
and the client certificate and key exist. The state's ``tls`` knobs make it fail the
first ``fail_times[address]`` times, or always (``never``). The real TLS path is shown
by enroll-host.sh's test and by the certificates' own tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate

PROG = "tls-check"


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    if len(argv) != 5:
        print("usage: tls_check ADDRESS PORT CA CERT KEY", file=sys.stderr)
        return 97
    address, port, ca, cert, key = argv
    with pvestate.locked() as state:
        knobs = state["tls"]
        if knobs.get("never"):
            return 1
        left = int(knobs["fail_times"].get(address, 0))
        if left > 0:
            knobs["fail_times"][address] = left - 1
            return 1
        guests = [g for g in state["guests"].values() if g.get("ip") == address and g["status"] == "running"]
    if port != "2376" or len(guests) != 1 or not Path(cert).is_file() or not Path(key).is_file():
        return 1
    guest = guests[0]
    served = guest["pushed"].get("/etc/docker/certs/server-cert.pem")
    pushed_ca = guest["pushed"].get("/etc/docker/certs/ca.pem")
    docker = guest.get("docker", {})
    if not served or not docker.get("active") or docker.get("serving_cert") != served["sha256"]:
        return 1
    if f"ips={address}" not in served.get("text", "") and f",{address}" not in served.get("text", ""):
        return 1
    if not pushed_ca or Path(ca).read_text() != pushed_ca.get("text"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
