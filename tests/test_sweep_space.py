"""The sweep's parameter space, constraints and objective, against Python's own semantics.

Ranges are compared with Python's ``range`` (and exact quarters for floats), grids with
``itertools.product``, constraints with Python evaluating the same expression on the
same values (test code only; the module under test never evaluates user text).
"""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from typing import Any

import msgspec
import pytest

from runner.sweep.constraint import ConstraintError, parse_constraint
from runner.sweep.objective import Objective, ObjectiveError, metric_names, parse_maximize, rank
from runner.sweep.plan import check_space, plan_grid
from runner.sweep.space import (
    MAX_COMBINATIONS,
    Dimension,
    Random,
    Range,
    SpaceError,
    Values,
    grid,
    grid_size,
    parse_grid_arg,
    parse_random_arg,
    parse_space,
)

# --- ranges -------------------------------------------------------------------------------


def test_integer_ranges_are_pythons_range() -> None:
    rng = random.Random(11)
    checked = 0
    while checked < 300:
        start, stop = rng.randint(-50, 50), rng.randint(-50, 50)
        step = rng.choice([-7, -3, -2, -1, 1, 2, 3, 5])
        want = list(range(start, stop, step))
        if not want:
            with pytest.raises(ValueError, match="empty"):
                Range(start, stop, step)
            continue
        got = Range(start, stop, step)
        assert got.values() == want and got.count() == len(want)
        assert all(type(v) is int for v in got.values())
        checked += 1


def test_float_ranges_follow_range_semantics() -> None:
    # quarters are exact in binary: the expected values are exact too
    rng = random.Random(12)
    for _ in range(200):
        start, stop = rng.randint(-40, 40), rng.randint(-40, 40)
        step = rng.choice([-3, -1, 1, 2, 5])
        want = [v / 4 for v in range(start, stop, step)]
        if want:
            assert Range(start / 4, stop / 4, step / 4).values() == want


@pytest.mark.parametrize(
    ("start", "stop", "step", "want"),
    [
        (0, 0.3, 0.1, [0.0, 0.1, 0.2]),
        (0, 1, 0.1, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
        (0.1, 0.4, 0.1, [0.1, 0.2, 0.3]),
        (-0.3, 0.31, 0.1, [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]),
        (1, 0, -0.25, [1.0, 0.75, 0.5, 0.25]),
        (0.5, 2, 0.5, [0.5, 1.0, 1.5]),
        (1.5, 3.0, 0.3, [1.5, 1.8, 2.1, 2.4, 2.7]),
        (0.001, 0.0045, 0.001, [0.001, 0.002, 0.003, 0.004]),
        (5, 30.0, 5, [5.0, 10.0, 15.0, 20.0, 25.0]),
    ],
)
def test_float_ranges_have_no_rounding_noise(
    start: float, stop: float, step: float, want: list[float]
) -> None:
    got = Range(start, stop, step).values()
    assert got == want
    assert all(type(v) is float for v in got)
    assert not any(str(v).startswith("-0.0") and v == 0 for v in got)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 30, 0), "step must not be zero"),
        ((5, 30, 0.0), "step must not be zero"),
        ((30, 5, 1), "empty"),
        ((5, 30, -1), "empty"),
        ((5, 5, 1), "empty"),
        ((0, 10**9, 1), "more than"),
        ((0.0, 1e300, 1e-300), "more than"),
        ((0, math.inf, 1), "finite"),
        ((math.nan, 1, 1), "finite"),
    ],
)
def test_bad_ranges_are_clear_errors(args: tuple[float, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Range(*args)


# --- command-line forms -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "values"),
    [
        ("fast=5:30:5", "fast", [5, 10, 15, 20, 25]),
        ("fast=5:10", "fast", [5, 6, 7, 8, 9]),
        (" k = 0:1:0.25 ", "k", [0.0, 0.25, 0.5, 0.75]),
        ("k=1:0:-0.5", "k", [1.0, 0.5]),
        ("fast=5,10,20", "fast", [5, 10, 20]),
        ("fast=7", "fast", [7]),
        ("ma=sma,ema", "ma", ["sma", "ema"]),
        ('v=5, 10.5, true, "a,b"', "v", [5, 10.5, True, "a,b"]),
        ("v=5,ema", "v", [5, "ema"]),
        ("t=09:30,10:30", "t", ["09:30", "10:30"]),
        ('t="09:30"', "t", ["09:30"]),
        ("x=-2:2", "x", [-2, -1, 0, 1]),
        ("x=1e-3:3e-3:1e-3", "x", [0.001, 0.002]),
    ],
)
def test_grid_args(text: str, name: str, values: list[Any]) -> None:
    got_name, dimension = parse_grid_arg(text)
    assert got_name == name
    got = dimension.values() if isinstance(dimension, Range) else dimension.values
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]


@pytest.mark.parametrize(
    ("text", "param", "message"),
    [
        ("fast", "", "expected name=start:stop"),
        ("=5:10", "", "expected name=start:stop"),
        ("fast=", "fast", "nothing after"),
        ("fast=5:x", "fast", "stop 'x' is not a number"),
        ("fast=a:10:2", "fast", "start 'a' is not a number"),
        ("fast=5:30:0", "fast", "step must not be zero"),
        ("fast=30:5", "fast", "empty"),
        ("fast=1:2:3:4", "fast", "expected start:stop or start:stop:step"),
        ("fast=1:inf", "fast", "finite"),
        ("9x=1:2", "9x", "not a valid parameter name"),
        ("v=1,,2", "v", "empty"),
        ("v=1,", "v", "empty"),
        ("v=[1,2]", "v", "not a number, boolean or string"),
        ("v=null", "v", "not a number, boolean or string"),
        ("v=1,2,1", "v", "listed twice"),
        ("v=NaN", "v", "finite"),
    ],
)
def test_bad_grid_args_name_the_parameter(text: str, param: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message) as info:
        parse_grid_arg(text)
    assert info.value.param == param
    if param:
        assert repr(param) in str(info.value)


@pytest.mark.parametrize(
    ("text", "low", "high", "kind"),
    [
        ("n=1:10", 1, 10, "int"),
        ("x=1:10.5", 1.0, 10.5, "float"),
        ("x=1:10:float", 1.0, 10.0, "float"),
        ("lr=0.001:0.1:log", 0.001, 0.1, "log"),
    ],
)
def test_random_args(text: str, low: float, high: float, kind: str) -> None:
    _, dim = parse_random_arg(text)
    assert (dim.low, dim.high, dim.kind) == (low, high, kind)
    assert type(dim.low) is type(low)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x=5:1", "must be below"),
        ("x=0:1:log", "low > 0"),
        ("x=1:2:normal", "not one of int, float, log"),
        ("x=1.5:3:int", "integer bounds"),
        ("x=1", "expected low:high"),
        ("x=a:2", "low 'a' is not a number"),
    ],
)
def test_bad_random_args(text: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message) as info:
        parse_random_arg(text)
    assert info.value.param == "x"


def test_json_space_is_tagged_and_errors_name_the_parameter() -> None:
    space = parse_space(
        {
            "fast": {"type": "range", "start": 5, "stop": 30, "step": 5},
            "ma": {"type": "values", "values": ["sma", "ema"]},
            "lr": {"type": "random", "low": 0.001, "high": 0.1, "kind": "log"},
        }
    )
    assert space == {"fast": Range(5, 30, 5), "ma": Values(["sma", "ema"]), "lr": Random(0.001, 0.1, "log")}
    assert list(space) == ["fast", "ma", "lr"]  # the order given is the grid's order
    assert msgspec.json.decode(msgspec.json.encode(space), type=dict[str, Range | Values | Random]) == space
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"fast": {"type": "range", "start": 5}}, "fast", "required field"),
        ({"fast": {"type": "range", "start": 5, "stop": 3}}, "fast", "empty"),
        ({"fast": {"type": "grid", "values": [1]}}, "fast", "Invalid value 'grid'"),
        ({"fast": {"type": "values", "values": [1], "extra": 1}}, "fast", "unknown field"),
        ({"slow": {"type": "values", "values": []}}, "slow", "length"),
        ({}, "", "1 to 16 parameters"),
        ({"9x": {"type": "values", "values": [1]}}, "9x", "not a valid parameter name"),
    ]
    for raw, param, message in cases:
        with pytest.raises(SpaceError, match=message) as info:
            parse_space(raw)
        assert info.value.param == param, str(info.value)


# --- grids --------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_in_order() -> None:
    space: dict[str, Dimension] = {"a": Values([1, 2]), "b": Values(["x", "y", "z"]), "c": Range(0, 1, 0.5)}
    want = [{"a": a, "b": b, "c": c} for a, b, c in itertools.product([1, 2], ["x", "y", "z"], [0.0, 0.5])]
    assert grid(space) == want
    assert grid_size(space) == 12
    assert grid(space) == grid(space)


def test_grid_cap_and_limits() -> None:
    space: dict[str, Dimension] = {"fast": Range(5, 30, 5), "slow": Range(10, 70, 10)}
    assert len(grid(space, cap=30)) == 30
    with pytest.raises(SpaceError, match="more than 29 combinations"):
        grid(space, cap=29)
    kept = grid(space, constraint=parse_constraint("fast < slow", space), cap=24)
    assert kept == [c for c in grid(space) if int(c["fast"]) < int(c["slow"])] and len(kept) == 24
    with pytest.raises(SpaceError, match=f"more than {MAX_COMBINATIONS:,}"):
        grid({"a": Range(0, 100_000), "b": Range(0, 11)})
    with pytest.raises(SpaceError, match="random distribution") as info:
        grid({"fast": Range(5, 10), "lr": Random(0.1, 1.0)})
    assert info.value.param == "lr"


# --- constraints --------------------------------------------------------------------------

PARAMS = ("fast", "slow", "period", "ma", "k")
COMBOS = [
    {"fast": f, "slow": s, "period": p, "ma": m, "k": k}
    for f, s, p, m, k in itertools.product([5, 10, 20], [10, 30], [10, 14], ["sma", "ema"], [0.5, 2.0])
]
GOOD = [
    "fast < slow",
    "fast * 2 <= slow and period != 10",
    "5 <= fast < slow",
    "fast < slow <= period * 3",
    "not (fast >= slow)",
    "not fast >= slow or period == 10",
    "fast < slow or period == 10 and ma == 'ema'",
    "(fast < slow or period == 10) and ma == 'ema'",
    "abs(fast - slow) > 10",
    "min(fast, slow) * 3 >= max(fast, slow, period)",
    "fast % 4 == 1",
    "slow // fast >= 2",
    "fast / slow < 0.5",
    "2 ** fast > slow ** 2",
    "-fast < -slow + 12",
    "+k * fast >= 10",
    "(fast + 1) * (slow - 1) > 150",
    "k ** 0.5 < 1",
    'ma != "sma"',
    "True",
    "fast < slow and True",
    "fast >= 1e1",
]


@pytest.mark.parametrize("expression", GOOD)
def test_constraints_evaluate_as_python_does(expression: str) -> None:
    constraint = parse_constraint(expression, PARAMS)
    reference = compile(expression, "<test>", "eval")
    for combo in COMBOS:
        want = bool(eval(reference, {"__builtins__": {"abs": abs, "min": min, "max": max}}, dict(combo)))
        assert constraint.holds(combo) is want, combo


def test_constraint_reports_the_names_it_reads() -> None:
    c = parse_constraint("  slow > fast and slow < 100 ", PARAMS)
    assert c.names == ("slow", "fast")
    assert c.expression == "slow > fast and slow < 100"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "calling '__import__' is not allowed"),
        ("__import__('os').system('true')", r"calling .__import__\('os'\).system. is not allowed"),
        ("open('x')", "calling 'open' is not allowed"),
        ("fast.real > 1", "attribute access is not allowed"),
        ("().__class__", "attribute access"),
        ("fast[0] > 1", "a subscript is not allowed"),
        ("(lambda: 1)()", "calling '(lambda: 1)' is not allowed"),
        ("lambda: 1", "a lambda expression is not allowed"),
        ("fast < slow and [1, 2]", "a list is not allowed"),
        ("fast in (1, 2)", "'in' is not allowed"),
        ("fast is None", "'is' is not allowed"),
        ("fast if slow else period", "a conditional expression"),
        ("(x := 1)", "an assignment expression"),
        ("[i for i in ()]", "a comprehension"),
        ("f'{fast}' == '5'", "an f-string"),
        ("~fast > 1", "the operator ~"),
        ("fast & slow", "BitAnd"),
        ("fast - slow", "is a value, not a test"),
        ("abs(fast)", "is a value, not a test"),
        ("fast < slow and slow * 2", "is a value, not a test"),
        ("max(fast) > 1", "at least 2 argument"),
        ("abs(fast, slow) > 1", "takes 1 argument"),
        ("abs(x=fast) > 1", "plain positional arguments"),
        ("min(*fast) > 1", "plain positional arguments"),
        ("min < 3", "is a function"),
        ("None == fast", "literal None"),
        ("fast <", "not a valid expression"),
        ("import os", "not a valid expression"),
        ("   ", "is empty"),
        ("fast < " + "(" * 250 + "1" + ")" * 250, "nested too deeply|not a valid expression"),
        (" or ".join(["k < k"] * 80), "more than 300 parts"),
    ],
)
def test_constraints_outside_the_whitelist_are_rejected(expression: str, message: str) -> None:
    with pytest.raises(ConstraintError, match=message):
        parse_constraint(expression, PARAMS)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ConstraintError) as info:
        parse_constraint("fast < slwo", ["fast", "slow"])
    assert "unknown name 'slwo'" in str(info.value)
    assert "the sweep's parameters are: fast, slow" in str(info.value)
    with pytest.raises(ConstraintError, match="unknown name 'os'"):
        parse_constraint("os == 1", ["fast"])


@pytest.mark.parametrize(
    ("expression", "combo", "message"),
    [
        ("fast / (slow - slow) > 1", {"fast": 1, "slow": 2}, "division by zero"),
        ("fast % (slow - 2) == 0", {"fast": 1, "slow": 2}, "modulo by zero"),
        ("fast ** slow > 1", {"fast": 2, "slow": 1000}, "exponent 1000"),
        ("ma * 3 == 'x'", {"ma": "sma"}, "needs numbers"),
        ("ma < 3", {"ma": "sma"}, "'<' not supported"),
        ("fast < slow", {"fast": 1}, "no value for 'slow'"),
    ],
)
def test_evaluation_errors_are_constraint_errors(
    expression: str, combo: dict[str, Any], message: str
) -> None:
    constraint = parse_constraint(expression, ["fast", "slow", "ma"])
    with pytest.raises(ConstraintError, match=message):
        constraint.holds(combo)


def test_the_constraint_module_never_evaluates_text() -> None:
    import ast
    from pathlib import Path

    import runner.sweep.constraint as module

    tree = ast.parse(Path(module.__file__).read_text())
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}, called


# --- maximize and ranking -----------------------------------------------------------------


def test_maximize_parsing() -> None:
    assert len(metric_names()) == 24
    assert parse_maximize("sharpe_ratio") == Objective("sharpe_ratio", minimize=False)
    assert parse_maximize(" -max_drawdown_pct ") == Objective("max_drawdown_pct", minimize=True)
    assert parse_maximize("-max_drawdown_pct").text == "-max_drawdown_pct"
    for bad in ("sharpe", "-", "", "final equity", "--final_equity"):
        with pytest.raises(ObjectiveError) as info:
            parse_maximize(bad)
        assert "known metrics: total_return, total_return_pct" in str(info.value)
        assert "final_equity" in str(info.value)


def test_ranking_puts_undefined_values_last() -> None:
    values: list[Any] = [1.0, None, math.nan, 3, math.inf, 2.0, "x", True]
    entries: list[dict[str, Any]] = [
        {"index": i, "metrics": {"sharpe_ratio": v}} for i, v in enumerate(values)
    ]
    entries.append({"index": len(values), "metrics": None})  # a failed combination
    best_first = [e["index"] for e in rank(entries, parse_maximize("sharpe_ratio"))]
    assert best_first == [3, 5, 0, 1, 2, 4, 6, 7, 8]
    lowest_first = [e["index"] for e in rank(entries, parse_maximize("-sharpe_ratio"))]
    assert lowest_first == [0, 5, 3, 1, 2, 4, 6, 7, 8]
    assert parse_maximize("sharpe_ratio").better({"sharpe_ratio": 0.1}, {"sharpe_ratio": None})
    assert not parse_maximize("sharpe_ratio").better(None, {"sharpe_ratio": -5})


# --- the space against a strategy ---------------------------------------------------------


def test_plan_grid_drops_and_counts_invalid_combinations() -> None:
    space: dict[str, Dimension] = {"fast": Range(5, 30, 5), "slow": Range(10, 70, 10)}
    plan = plan_grid(space, "sma_cross")
    assert (plan.total, plan.excluded, plan.invalid) == (30, 0, 6)
    assert plan.combinations == [c for c in grid(space) if int(c["fast"]) < int(c["slow"])]
    assert "must be smaller than slow" in plan.invalid_examples[0]
    constrained = plan_grid(space, "sma_cross", constraint=parse_constraint("fast < slow", space))
    assert (constrained.excluded, constrained.invalid) == (6, 0)
    assert constrained.combinations == plan.combinations
    with pytest.raises(SpaceError, match="more than 23 combinations"):
        plan_grid(space, "sma_cross", cap=23)
    with pytest.raises(
        SpaceError, match=r"no combination is left to run: 2 in the grid, 2 rejected by sma_cross"
    ):
        plan_grid({"fast": Values([30, 40]), "slow": Values([20])}, "sma_cross")
    with pytest.raises(SpaceError, match="1 excluded by the constraint"):
        plan_grid({"fast": Values([5])}, "sma_cross", constraint=parse_constraint("fast > 5", ["fast"]))


@pytest.mark.parametrize(
    ("space", "base", "param", "message"),
    [
        (
            {"fats": Values([5])},
            None,
            "fats",
            "not a parameter of strategy sma_cross; its parameters are: fast, slow",
        ),
        ({"fast": Range(5, 10, 2.5)}, None, "fast", "the value 7.5 does not fit strategy sma_cross"),
        ({"fast": Values([0, 5])}, None, "fast", "the value 0 does not fit.*>= 1"),
        ({"fast": Values(["ema"])}, None, "fast", "the value 'ema' does not fit"),
        ({"fast": Random(1, 10, "float")}, None, "fast", "sample it with kind 'int'"),
        ({"fast": Values([5])}, {"fast": 6}, "fast", "both swept and fixed"),
    ],
)
def test_space_is_checked_against_the_strategy(
    space: dict[str, Any], base: dict[str, Any] | None, param: str, message: str
) -> None:
    with pytest.raises(SpaceError, match=message) as info:
        check_space(space, "sma_cross", base)
    assert info.value.param == param


def test_space_check_accepts_fitting_values() -> None:
    check_space({"fast": Range(5, 30, 5), "slow": Random(20, 200, "int")}, "sma_cross")
    check_space({"k": Range(1.0, 3.0, 0.5), "period": Values([10, 20.0])}, "bollinger_reversion")
    check_space({"threshold": Random(0.0, 0.5)}, "model")


def test_importing_the_space_needs_no_numpy() -> None:
    code = (
        "import sys; import runner.sweep.space, runner.sweep.constraint, runner.sweep.objective, "
        "runner.sweep.plan; print(sorted(m for m in ('numpy', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
