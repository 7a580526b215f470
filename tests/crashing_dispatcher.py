"""A ``ktrdr-run dispatcher`` process that also knows the kind ``crash_dispatcher``, which
exists only in the tests: admitting it kills the dispatcher process on the spot (SIGKILL,
as a segfault in a data reader would), every time it is handled.

Run as ``python -m tests.crashing_dispatcher`` with KTRDR_RUN_CONFIG set. With the
argument ``requeue`` it also dies (SIGKILL) the moment an operator's requeue has moved an
op back to ``queued``, before the op's job message is published: the worst point for a
requeuer to vanish.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from msgspec import Struct

from dispatcher.opstore import OpStore
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


def die_after_reopen() -> None:
    """Make every successful operator requeue kill this process right after its write."""
    reopen = OpStore.reopen

    async def reopen_then_die(self: OpStore, *args: Any, **kwargs: Any) -> Any:
        updated = await reopen(self, *args, **kwargs)
        if updated is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return updated

    OpStore.reopen = reopen_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    if sys.argv[1:] == ["requeue"]:
        die_after_reopen()
    sys.exit(main(["-v", "dispatcher"]))
