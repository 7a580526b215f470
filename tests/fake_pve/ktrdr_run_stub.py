#!/usr/bin/env python3
"""A recording stand-in for ``ktrdr-run`` on a Proxmox node: only ``certs issue HOST
[--ip ADDR ...] [--dns NAME ...] -o DIR``, which writes a bundle (``ca.pem``,
``server-cert.pem``, ``server-key.pem`` whose text names the host and addresses, so the
TLS check stub can tell which worker a certificate is for) and prints the
``tls_ca``/``tls_cert``/``tls_key`` lines as the real command does (its client
certificate files are created next to the state file, under ``ktrdr-state/certs``).
Anything else fails loudly (exit 97). The real command is shown by its own tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate
from pvestate import unsupported

PROG = "ktrdr-run"


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    if argv[:2] != ["certs", "issue"] or len(argv) < 3:
        unsupported(PROG, " ".join(argv) or "(nothing)", "certs issue HOST [--ip ADDR] [--dns NAME] -o DIR")
    host, rest = argv[2], argv[3:]
    ips: list[str] = []
    out = None
    i = 0
    while i < len(rest):
        if rest[i] in ("--ip", "--dns", "-o", "--output") and i + 1 < len(rest):
            if rest[i] == "--ip":
                ips.append(rest[i + 1])
            elif rest[i] in ("-o", "--output"):
                out = Path(rest[i + 1])
            i += 2
        else:
            unsupported(PROG, f"certs issue option {rest[i]!r}", "--ip ADDR, --dns NAME, -o DIR")
    if out is None:
        unsupported(PROG, "certs issue without -o", "certs issue HOST ... -o DIR")
    certs = pvestate.state_path().with_name("ktrdr-state") / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "client-cert.pem", "client-key.pem"):
        if not (certs / name).exists():
            (certs / name).write_text(f"STUB {name}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_text("STUB ca.pem\n")
    (out / "server-cert.pem").write_text(f"STUB server certificate host={host} ips={','.join(ips)}\n")
    (out / "server-key.pem").write_text(f"STUB server key host={host}\n")
    (out / "server-key.pem").chmod(0o600)
    print(
        f"server certificate for {host} (DNS {host}{''.join(', IP ' + a for a in ips)}), "
        "valid until 2028-01-01:"
    )
    for name in ("ca.pem", "server-cert.pem", "server-key.pem"):
        print(f"  {out / name}")
    print("the dispatcher reaches it with:")
    for key, name in (("tls_ca", "ca.pem"), ("tls_cert", "client-cert.pem"), ("tls_key", "client-key.pem")):
        print(f"  {key} = {json.dumps(str(certs / name))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
