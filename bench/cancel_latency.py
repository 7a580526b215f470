"""Cancel latency: cancel request → runner's acknowledgement, and → container removed.

For each of N `probe` ops (held open), one at a time: wait until it runs, publish a
cancel request, and time (a) the `cancel_ack` event reaching the client and (b) the
engine's `destroy` event for the op's container (the engine's own clock, nanoseconds).
Prints median and p95 of both.

    python bench/cancel_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid

import docker
from harness import bench_stack, describe

from runner.protocol import LABEL_OP_ID, CancelAckEvent, Job, Resources, StatusEvent


class DestroyWatcher:
    """Records when the engine destroys each op's container (docker events, own thread)."""

    def __init__(self) -> None:
        self.client = docker.from_env()
        self.destroyed: dict[str, float] = {}
        self._events = self.client.events(
            decode=True, filters={"type": "container", "event": "destroy", "label": LABEL_OP_ID}
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._events:
                op_id = event.get("Actor", {}).get("Attributes", {}).get(LABEL_OP_ID, "")
                self.destroyed[op_id] = event.get("timeNano", 0) / 1e9 or time.time()
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            return

    async def wait_for(self, op_id: str, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while op_id not in self.destroyed:
            if time.monotonic() > deadline:
                raise SystemExit(f"container of {op_id} was not removed within {timeout_s}s")
            await asyncio.sleep(0.005)
        return self.destroyed[op_id]

    def close(self) -> None:
        self._events.close()
        self.client.close()


async def main(runs: int) -> None:
    watcher = DestroyWatcher()
    to_ack, to_removed = [], []
    try:
        async with bench_stack() as stack:
            session = stack.session
            for _ in range(runs):
                job = Job(
                    job_id=f"cancel-{uuid.uuid4().hex[:10]}",
                    kind="probe",
                    params={"hold_s": 120, "tick_s": 0.5},
                    resources=Resources(cpus=0.5, memory_gb=0.25),
                )
                op_id = await session.submit(job)
                sent = 0.0
                async for event in session.follow(op_id):
                    if isinstance(event, StatusEvent) and event.state == "running" and not sent:
                        await asyncio.sleep(0.3)  # let the runner get into its hold loop
                        sent = time.time()
                        await session.cancel(op_id, reason="bench")
                    elif isinstance(event, CancelAckEvent):
                        to_ack.append(time.time() - sent)
                record = await session.record(op_id)
                if record.state != "cancelled" or not (record.cancel and record.cancel.acked):
                    raise SystemExit(f"op {op_id} ended {record.state}, cancel {record.cancel}")
                to_removed.append(await watcher.wait_for(op_id) - sent)
    finally:
        watcher.close()
    print(f"ops                                 {runs}, one at a time, probe hold_s=120")
    print(f"cancel request -> cancel_ack        {describe(to_ack)}")
    print(f"cancel request -> container removed {describe(to_removed)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
