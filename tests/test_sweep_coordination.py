"""The coordinator's pure parts, without NATS or Docker: child ids, trial rounds and the
tally (ranking, counts, best-so-far curve, surface, results table), each checked against
values worked out by hand."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from dispatcher.sweep_children import child_prefix, chunk_id, chunk_range
from dispatcher.sweep_results import Tally
from dispatcher.sweep_trials import GridSource, round_sizes, trial_source
from runner import registry
from runner.ops.sweep import SweepParams, objective_of
from runner.protocol import is_valid_id
from runner.sweep.objective import parse_maximize


def sweep(**params: object) -> SweepParams:
    parsed = registry.get("sweep").parse_params({"strategy": "sma_cross", "symbol": "DEMO", **params})
    assert isinstance(parsed, SweepParams)
    return parsed


def entry(index: int, fast: int, slow: int, value: float | None, trades: int = 3) -> dict[str, object]:
    metrics = (
        None
        if value is None
        else {"final_equity": value, "sharpe_ratio": value / 1e5, "total_trades": trades}
    )
    return {"index": index, "params": {"fast": fast, "slow": slow}, "metrics": metrics, "error": None}


@pytest.mark.parametrize("parent", ["20261202-052715-dc8baf2c", "p", "x" * 80])
def test_child_ids_name_their_span_and_stay_valid_ids(parent: str) -> None:
    child = chunk_id(parent, 1280, 40)
    assert is_valid_id(child) and child.startswith(child_prefix(parent))
    assert chunk_range(parent, child) == (1280, 40)
    assert chunk_range(parent, f"{child_prefix(parent)}-v") is None
    assert chunk_range(parent, chunk_id("other", 0, 5)) is None


def test_round_sizes_follow_the_params_alone() -> None:
    space = {"fast": {"type": "random", "low": 2, "high": 30, "kind": "int"}}
    assert round_sizes(sweep(space=space, method="random", max_tries=50)) == [50]
    assert round_sizes(sweep(space=space, method="tpe", max_tries=100)) == [13] * 7 + [9]
    assert round_sizes(sweep(space=space, method="tpe", max_tries=25, round_size=4)) == [10, 4, 4, 4, 3]
    assert round_sizes(sweep(space=space, method="tpe", max_tries=6)) == [6]


def test_a_grid_is_one_round_in_itertools_order_without_excluded_or_invalid() -> None:
    params = sweep(
        space={
            "fast": {"type": "values", "values": [10, 20, 30]},
            "slow": {"type": "values", "values": [20, 40]},
        },
        constraint="slow != 40 or fast != 10",
    )
    source = trial_source(params, objective_of(params))
    assert isinstance(source, GridSource)
    trials = source.next_round({})
    assert trials is not None
    # (10,20) ok, (10,40) excluded, (20,20) invalid (fast >= slow), (20,40), (30,20) invalid, (30,40)
    assert [(t.index, t.params["fast"], t.params["slow"]) for t in trials] == [
        (0, 10, 20),
        (1, 20, 40),
        (2, 30, 40),
    ]
    assert (source.planned, source.excluded, source.invalid) == (3, 1, 2)
    assert source.next_round({}) is None


def test_tpe_asks_the_same_trials_for_the_same_seed_and_learns_between_rounds() -> None:
    space = {
        "fast": {"type": "random", "low": 2, "high": 30, "kind": "int"},
        "slow": {"type": "random", "low": 10, "high": 90, "kind": "int"},
    }

    def run(seed: int, results_shift: float = 0.0) -> list[tuple[int, int]]:
        params = sweep(
            space=space,
            method="tpe",
            max_tries=30,
            round_size=10,
            random_state=seed,
            constraint="slow > fast + 4",
        )
        source = trial_source(params, objective_of(params))
        told: dict[int, dict[str, float] | None] = {}
        asked: list[tuple[int, int]] = []
        while (trials := source.next_round(told)) is not None:
            for t in trials:
                fast, slow = int(t.params["fast"]), int(t.params["slow"])
                assert slow > fast + 4 and fast < slow
                asked.append((fast, slow))
                # a peak at fast=8, slow=60
                told[t.index] = {
                    "final_equity": 1e5
                    - (fast - 8) ** 2 * 100
                    - (slow - 60) ** 2 * 10
                    + results_shift * t.index
                }
        return asked

    first, again, other = run(5), run(5), run(6)
    assert len(first) == 30 and first == again and first != other
    # the first round is random start-up; the told results steer the third round towards the peak
    assert run(5, results_shift=50.0)[:10] == first[:10]
    distance = [abs(f - 8) + abs(s - 60) / 5 for f, s in first]
    assert sum(distance[20:]) / 10 < sum(distance[:10]) / 10


def test_tally_ranks_counts_and_draws_the_best_so_far() -> None:
    tally = Tally(parse_maximize("final_equity"), ["fast", "slow"], planned=5)
    tally.add([entry(3, 20, 40, 120_000.0), entry(0, 10, 20, 110_000.0), entry(1, 10, 40, None)])
    tally.add([entry(2, 20, 20, 130_000.0, trades=0), entry(4, 30, 40, 130_000.0), entry(3, 99, 99, 1.0)])
    assert tally.counts() == {"done": 5, "succeeded": 4, "failed": 1, "zero_trade": 1}
    board = tally.leaderboard(3)
    # 130k twice: the lower index first; the failed one never on the board
    assert [(e["rank"], e["index"], e["value"]) for e in board] == [
        (1, 2, 130_000.0),
        (2, 4, 130_000.0),
        (3, 3, 120_000.0),
    ]
    assert tally.best is not None and tally.best["index"] == 2
    # in index order: 110k, (failed), 130k, 120k, 130k
    assert tally.best_curve() == [[1, 110_000.0], [3, 130_000.0], [5, 130_000.0]]
    surface = tally.surface({"fast": [10, 20, 30], "slow": [20, 40]})
    assert surface == {
        "x": "fast", "y": "slow", "xs": [10, 20, 30], "ys": [20, 40],
        "values": [[110_000.0, 130_000.0, None], [None, 120_000.0, 130_000.0]],
    }  # fmt: skip
    percent, message, numbers = tally.progress(in_flight=0, children=(2, 2))
    assert percent == 100.0 and numbers["best"] == 130_000.0 and "fast=20, slow=20" in message


def test_minimising_ranks_low_first_and_undefined_last() -> None:
    tally = Tally(parse_maximize("-final_equity"), ["fast", "slow"], planned=3)
    tally.add([entry(0, 10, 20, 5.0), entry(1, 10, 30, None), entry(2, 10, 40, 3.0)])
    assert [e["index"] for e in tally.ranked()] == [2, 0, 1]
    assert tally.best_curve() == [[1, 5.0], [3, 3.0]]


def test_results_table_has_a_row_per_combination() -> None:
    tally = Tally(parse_maximize("final_equity"), ["fast", "slow"], planned=2)
    tally.add([entry(1, 10, 40, None) | {"error": "boom"}, entry(0, 10, 20, 110_000.0)])
    table = pd.read_parquet(io.BytesIO(tally.parquet(["final_equity", "total_trades"])))
    assert table["index"].tolist() == [0, 1]
    assert table["fast"].tolist() == [10, 10] and table["slow"].tolist() == [20, 40]
    assert table["final_equity"].iloc[0] == 110_000.0 and pd.isna(table["final_equity"].iloc[1])
    assert pd.isna(table["error"].iloc[0]) and table["error"].iloc[1] == "boom"
