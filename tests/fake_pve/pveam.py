#!/usr/bin/env python3
"""A recording fake of Proxmox VE's ``pveam`` (the container template manager).

Only ``list STORAGE``: the templates downloaded to that storage, as the real command
prints them (a ``NAME SIZE`` header, then ``STORAGE:vztmpl/FILE  SIZE``). A storage
that does not hold container templates (content ``vztmpl``) or does not exist fails as
the real one does. ``update``, ``available``, ``download`` and anything else fail loudly
(exit 97): the scripts never download on their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate
from pvestate import die, unsupported

PROG = "pveam"


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    if len(argv) != 2 or argv[0] != "list":
        unsupported(PROG, f"'{' '.join(argv) or '(nothing)'}'", "list STORAGE")
    storage = argv[1]
    with pvestate.locked() as state:
        store = state["storages"].get(storage)
        if store is None:
            die(PROG, f"400 Parameter verification failed.\nstorage: storage '{storage}' does not exist")
        if "vztmpl" not in store["content"].split(","):
            die(PROG, f"storage '{storage}' does not support container templates")
        files = sorted(state["ostemplates"].get(storage, []))
    print(f"{'NAME':<80} SIZE")
    for name in files:
        print(f"{storage + ':vztmpl/' + name:<80} 120.29MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
