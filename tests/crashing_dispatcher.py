"""A ``ktrdr-run dispatcher`` process that also knows the kind ``crash_dispatcher``, which
exists only in the tests: admitting it kills the dispatcher process on the spot (SIGKILL,
as a segfault in a data reader would), every time it is handled.

Run as ``python -m tests.crashing_dispatcher`` with KTRDR_RUN_CONFIG set.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from msgspec import Struct

from ktrdr_run.cli import main
from runner.registry import operation
from runner.sdk import OpContext


class CrashParams(Struct, frozen=True, forbid_unknown_fields=True):
    """No params."""


def _crash(params: CrashParams, data_dir: Path | None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@operation("crash_dispatcher", params=CrashParams, preflight=_crash)
def crash_dispatcher(ctx: OpContext, params: CrashParams) -> dict[str, Any]:
    """Never runs: its preflight kills the dispatcher."""
    return {}


if __name__ == "__main__":
    sys.exit(main(["-v", "dispatcher"]))
