"""The op and strategy registries load once, whole, when threads ask at the same time
(the dispatcher validates jobs on worker threads; the first two jobs of a fresh process
once saw an empty strategy registry). Each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

FIRST_LOOKUPS = """
import sys, threading
from {module} import {lookup}
barrier = threading.Barrier(8)
errors = []
def ask():
    barrier.wait()
    try:
        {lookup}({name!r})
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=ask) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


@pytest.mark.parametrize(
    ("module", "lookup", "name"),
    [
        ("runner.backtest.strategies", "get_strategy", "sma_cross"),
        ("runner.registry", "get", "backtest"),
    ],
)
def test_first_lookups_from_many_threads_all_succeed(module: str, lookup: str, name: str) -> None:
    code = FIRST_LOOKUPS.format(module=module, lookup=lookup, name=name)
    for _ in range(5):  # a fresh interpreter each time: the first load is the race
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
