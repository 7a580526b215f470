"""The ``sweep`` op end to end: a coordinator in a real dispatcher, ``sweep_chunk`` children
in real containers, real NATS.

The grid check is independent of our engine: backtesting.py's ``Backtest.optimize`` runs
the same grid on the same real daily bars (GOOG), configured as tests/test_sweep_chunk.py
configures it, and every combination's final equity and the whole ranking must agree.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import pandas as pd
import pytest

from dispatcher.config import Config
from dispatcher.sweep_children import chunk_range
from ktrdr_run import Client
from ktrdr_run.errors import InvalidJob
from runner.protocol import TrialEvent
from tests.conftest import RunningDispatcher, creations, ktrdr_csv, run_cli, write_config
from tests.faults import publish_jobs, records, wait_states

pytestmark = [pytest.mark.docker, pytest.mark.nats]

backtesting = pytest.importorskip("backtesting")
from backtesting.test import GOOG  # noqa: E402

from tests.test_backtest_engine import peer_run, ref_sma_cross  # noqa: E402
from tests.test_sweep_chunk import REL, peer_optimize  # noqa: E402

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


@pytest.fixture
def data_dir(tmp_state: Path) -> Path:
    directory = tmp_state / "data"
    directory.mkdir()
    ktrdr_csv(GOOG, directory / "GOOG_1d.csv")
    directory.chmod(0o755)
    tmp_state.chmod(0o755)
    return directory


def goog_grid(**extra: Any) -> dict[str, Any]:
    return {
        "strategy": "sma_cross",
        "symbol": "GOOG",
        "commission": 0.001,
        "slippage": 0.0,
        "space": {
            "fast": {"type": "range", "start": 5, "stop": 30, "step": 5},
            "slow": {"type": "range", "start": 10, "stop": 70, "step": 10},
        },
        "constraint": "fast < slow",
        **extra,
    }


async def trial_events(client: Client, op_id: str) -> list[TrialEvent]:
    """Every ``trial`` event of a finished sweep, from the event stream."""
    op = client.op(op_id)
    out: list[TrialEvent] = []
    async for event in op.events():
        if isinstance(event, TrialEvent):
            out.append(event)
        elif getattr(event, "state", "") in TERMINAL:
            break
    return out


async def test_grid_sweep_ranks_as_backtesting_py_optimize_across_several_children(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path
) -> None:
    async with Client(config) as client:
        op = await client.submit(
            "sweep", goog_grid(chunk_size=8, top_k=24, maximize="final_equity"), data_dir=str(data_dir)
        )
        record = await op.wait(timeout_s=240)
        assert record.state == "completed", record.error
        result = record.result or {}
        stats, heatmap = await asyncio.to_thread(peer_optimize, range(5, 30, 5), range(10, 70, 10))

        # containers were really used: several chunk children, each linked to the sweep
        assert len(record.children) == 3, record.children
        # the sweep completes on its chunks' results; their containers exit just after
        await wait_states(config.nats.url, record.children, {"completed"}, 60)
        children = [await client.op(c).record() for c in record.children]
        assert all(c.kind == "sweep_chunk" and c.parent_id == op.op_id for c in children)
        assert all(c.state == "completed" and c.container_id for c in children)

        # 30 in the grid, 6 excluded by the constraint; the same 24 backtesting.py ran
        assert (result["total"], result["done"], result["excluded"], result["failed"]) == (24, 24, 6, 0)
        assert len(heatmap) == 24
        board = result["leaderboard"]
        assert [(e["params"]["fast"], e["params"]["slow"]) for e in board] == [
            tuple(int(v) for v in p) for p in heatmap.sort_values(ascending=False, kind="stable").index
        ]
        for entry in board:
            peer = float(heatmap[(entry["params"]["fast"], entry["params"]["slow"])])
            assert entry["metrics"]["final_equity"] == pytest.approx(peer, rel=REL), entry["params"]
            assert entry["value"] == entry["metrics"]["final_equity"]
            assert len(entry["metrics"]) == 24
        best = result["best"]
        assert (best["params"]["fast"], best["params"]["slow"]) == (
            stats._strategy.fast,
            stats._strategy.slow,
        )
        assert best["metrics"]["final_equity"] == pytest.approx(float(stats["Equity Final [$]"]), rel=REL)

        # one trial event per combination; the results table holds every one
        trials = await trial_events(client, op.op_id)
        assert sorted(t.index for t in trials) == list(range(24))
        table = pd.read_parquet(io.BytesIO(await client.artifact(record.artifacts["results"])))
        assert len(table) == 24 and {"fast", "slow", "final_equity", "sharpe_ratio", "error"} <= set(table)
        for row in table.itertuples():
            assert row.final_equity == pytest.approx(float(heatmap[(row.fast, row.slow)]), rel=REL)
        # the best-so-far curve never gets worse, and ends at the best
        values = [v for _, v in result["best_curve"]]
        assert values == sorted(values) and values[-1] == best["value"]
        surface = result["surface"]
        assert (surface["x"], surface["y"], surface["xs"]) == ("fast", "slow", [5, 10, 15, 20, 25])
        cell = surface["values"][surface["ys"].index(best["params"]["slow"])][
            surface["xs"].index(best["params"]["fast"])
        ]
        assert cell == best["value"]


async def test_random_and_tpe_sweeps_are_reproducible_and_honour_the_constraint(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path
) -> None:
    space = {
        "fast": {"type": "random", "low": 2, "high": 40, "kind": "int"},
        "slow": {"type": "random", "low": 10, "high": 120, "kind": "int"},
    }
    base = {"strategy": "sma_cross", "symbol": "GOOG", "space": space, "constraint": "slow >= fast + 10"}
    runs: list[tuple[str, int, dict[str, Any]]] = [
        ("random", 7, {"max_tries": 12}),
        ("random", 7, {"max_tries": 12}),
        ("random", 8, {"max_tries": 12}),
        ("tpe", 3, {"max_tries": 16, "round_size": 8, "maximize": "sharpe_ratio"}),
        ("tpe", 3, {"max_tries": 16, "round_size": 8, "maximize": "sharpe_ratio"}),
    ]
    async with Client(config) as client:
        ops = [
            await client.submit(
                "sweep", {**base, "method": m, "random_state": seed, **extra}, data_dir=str(data_dir)
            )
            for m, seed, extra in runs
        ]
        finals = await asyncio.gather(*(op.wait(timeout_s=300) for op in ops))
        tried: list[list[tuple[int, int]]] = []
        for op, final in zip(ops, finals, strict=True):
            assert final.state == "completed", final.error
            events = sorted(await trial_events(client, op.op_id), key=lambda t: t.index)
            combos = [(int(t.params["fast"]), int(t.params["slow"])) for t in events]
            assert all(slow >= fast + 10 and 2 <= fast <= 40 and slow <= 120 for fast, slow in combos)
            assert final.result is not None and final.result["done"] == len(combos)
            tried.append(combos)
        assert len(tried[0]) == 12 and tried[0] == tried[1]  # same seed, same trials
        assert tried[2] != tried[0]  # another seed, others
        assert len(tried[3]) == 16 and tried[3] == tried[4]
        tpe = finals[3]
        assert len(tpe.children) >= 2  # asked in two rounds: the second learnt from the first
        again = finals[4].result
        assert tpe.result is not None and again is not None
        assert [(e["params"], e["value"]) for e in tpe.result["leaderboard"]] == [
            (e["params"], e["value"]) for e in again["leaderboard"]
        ]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"constraint": "fast < slow and __import__('os')"}, "params.constraint", "not allowed"),
        ({"constraint": "fast <"}, "params.constraint", "not a valid expression"),
        ({"constraint": "fast < slo"}, "params.constraint", "unknown name 'slo'"),
        (
            {"space": {"fst": {"type": "range", "start": 5, "stop": 30}}},
            "params.space.fst",
            "not a parameter",
        ),
        ({"maximize": "sharpe"}, "params.maximize", "unknown metric"),
        ({"method": "tpe"}, "params.max_tries", "needs max_tries"),
    ],
)
async def test_a_bad_sweep_is_a_clear_error_before_any_container(
    config: Config,
    dispatcher: RunningDispatcher,
    docker_client: docker.DockerClient,
    change: dict[str, Any],
    field: str,
    words: str,
) -> None:
    params = {**goog_grid(), **change}
    if "space" in change:
        params["constraint"] = ""
    async with Client(config) as client:
        with pytest.raises(InvalidJob) as caught:
            await client.submit("sweep", params)
        assert caught.value.field == field and words in str(caught.value), str(caught.value)
    # another system publishing the raw message gets the same answer, and nothing starts
    since = time.time()
    job_id = f"bad-sweep-{abs(hash(field + words)) % 10**8}"
    await publish_jobs(config.nats.url, [{"job_id": job_id, "kind": "sweep", "params": params}])
    final = await wait_states(config.nats.url, [job_id], {"failed"}, 30)
    assert final[job_id]["error"]["field"] == field and not final[job_id].get("children")
    assert creations(docker_client).by_attempt(job_id, since) == {}


async def test_cancel_cancels_every_child_and_leaves_no_container(
    config: Config, dispatcher: RunningDispatcher, docker_client: docker.DockerClient
) -> None:
    space = {
        "fast": {"type": "range", "start": 2, "stop": 42},
        "slow": {"type": "range", "start": 50, "stop": 66},
    }
    async with Client(config) as client:
        op = await client.submit(
            "sweep", {"strategy": "sma_cross", "symbol": "DEMO", "space": space, "chunk_size": 20}
        )
        # wait until some chunk has finished, so the cancel lands mid-sweep
        deadline = time.monotonic() + 120
        while True:
            # a record appears once a dispatcher has taken the job; a child is listed
            # before its job is published
            listed = (await records(config.nats.url, [op.op_id])).get(op.op_id, {}).get("children", [])
            states = {c: r["state"] for c, r in (await records(config.nats.url, listed)).items()}
            if "completed" in states.values():
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.2)
        await op.cancel("enough")
        final = await op.wait(timeout_s=120)
    assert final.state == "cancelled" and final.cancel is not None and final.cancel.reason == "enough"
    assert len(final.children) == 32  # 640 combinations in chunks of 20, all listed at once
    children = await records(config.nats.url, final.children)
    ended = [r["state"] for r in children.values()]
    # every child ended: those that had finished stay completed, every other one is cancelled
    odd = {
        c: (r["state"], r.get("error"))
        for c, r in children.items()
        if r["state"] not in ("completed", "cancelled")
    }
    assert not odd and "cancelled" in ended, odd
    assert len(children) == 32, "a listed child never got a record"
    done = sum(1 for s in ended if s == "completed")
    assert final.result is not None and final.result["done"] == done * 20
    # (no_leftover_containers, through the dispatcher fixture, checks no container is left)


def _spans(parent: str, children: list[str]) -> list[tuple[int, int]]:
    spans = [chunk_range(parent, c) for c in children]
    assert all(s is not None for s in spans)
    return sorted(s for s in spans if s is not None)


def _covered_once(parent: str, children: list[str], total: int) -> None:
    covered = [i for first, count in _spans(parent, children) for i in range(first, first + count)]
    assert sorted(covered) == list(range(total)), "each combination is in exactly one chunk"


async def test_results_survive_json_round_trip(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path
) -> None:
    """What ``--json`` prints parses back, with result.leaderboard and result.best."""
    async with Client(config) as client:
        op = await client.submit("sweep", goog_grid(top_k=3), data_dir=str(data_dir))
        record = await op.wait(timeout_s=240)
    import msgspec

    doc = json.loads(msgspec.json.encode(record))
    assert [e["rank"] for e in doc["result"]["leaderboard"]] == [1, 2, 3]
    assert doc["result"]["best"] == doc["result"]["leaderboard"][0]
    _covered_once(record.op_id, record.children, 24)


async def test_the_sweep_command_one_shot_prints_leaderboard_and_heatmap_and_json(
    config: Config, tmp_state: Path, data_dir: Path, runner_image: str, no_leftover_containers: None
) -> None:
    """No dispatcher runs: the command's own one-shot dispatcher coordinates the sweep and
    runs its children (and nothing else)."""
    config_path = write_config(config, tmp_state / "cli.toml")
    args = [
        "sweep", "--strategy", "sma_cross", "--symbol", "GOOG", "--grid", "fast=5:30:5",
        "--grid", "slow=10:70:10", "--constraint", "fast < slow", "--commission", "0.001",
        "--slippage", "0", "--top", "5", "--chunk-size", "12", "--data-dir", str(data_dir),
    ]  # fmt: skip
    shown = await asyncio.to_thread(run_cli, args, config_path, 300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    done = await asyncio.to_thread(run_cli, [*args, "--json"], config_path, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["state"] == "completed" and len(record["children"]) == 2
    board = record["result"]["leaderboard"]
    assert [e["rank"] for e in board] == [1, 2, 3, 4, 5] and record["result"]["best"] == board[0]
    best = board[0]["params"]
    # the table names the same best first, and the heatmap has a row per slow value
    text = shown.stdout
    first_row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["1"])
    assert first_row[1:3] == [str(best["fast"]), str(best["slow"])], text
    assert "by fast (columns) and slow (rows)" in text, text
    for slow in range(10, 70, 10):
        assert any(line.strip().startswith(str(slow)) for line in text.splitlines()), (slow, text)


def peer_final_equity(start: str, end: str, fast: int, slow: int) -> float:
    """backtesting.py's final equity of sma_cross on GOOG from ``start`` to ``end``."""
    frame = GOOG.loc[start:end]
    bars = SimpleNamespace(close=frame.Close.to_numpy(float))
    signals = ref_sma_cross(bars, fast, slow, False)  # type: ignore[arg-type]
    return float(peer_run(frame, list(signals), commission=0.001, fraction=None)["Equity Final [$]"])


async def test_validation_reports_out_of_sample_figures_beside_in_sample(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path
) -> None:
    space = {"fast": {"type": "values", "values": [10, 20]}, "slow": {"type": "values", "values": [30, 50]}}
    params = {
        "strategy": "sma_cross", "symbol": "GOOG", "commission": 0.001, "slippage": 0.0, "space": space,
        "start": "2005-01-01", "end": "2009-12-31", "validate_start": "2010-01-01",
        "validate_end": "2013-03-01", "top_k": 2,
    }  # fmt: skip
    async with Client(config) as client:
        record = await (await client.submit("sweep", params, data_dir=str(data_dir))).wait(timeout_s=240)
    assert record.state == "completed", record.error
    result = record.result or {}
    assert result["validation"] == {"start": "2010-01-01", "end": "2013-03-01"}
    board = result["leaderboard"]
    assert len(board) == 2 and record.children[-1].endswith("-v")
    for entry in board:
        fast, slow = entry["params"]["fast"], entry["params"]["slow"]
        in_sample = await asyncio.to_thread(peer_final_equity, "2005-01-01", "2009-12-31", fast, slow)
        out_of_sample = await asyncio.to_thread(peer_final_equity, "2010-01-01", "2013-03-01", fast, slow)
        assert entry["metrics"]["final_equity"] == pytest.approx(in_sample, rel=REL)
        assert entry["validation"]["final_equity"] == pytest.approx(out_of_sample, rel=REL)
        assert len(entry["validation"]) == 24
