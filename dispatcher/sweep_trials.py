"""Where a sweep's combinations come from, round by round.

A grid is one round holding every combination of the plan. ``random`` and ``tpe`` ask
Optuna's samplers (seeded by ``random_state``) in rounds: each round's results are told
before the next round is asked, so TPE learns from what ran. Round sizes follow from the
params alone, never from timing or capacity, so a sweep asked again with the same
``random_state`` — or resumed after its dispatcher restarted — gets the same trials.

Optuna is imported only here, in the dispatcher: containers never import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from runner.ops.sweep import SweepParams, constraint_of, plan
from runner.sweep.objective import Objective
from runner.sweep.plan import invalid_reason
from runner.sweep.space import Random, Range, Scalar, Values, grid_values

if TYPE_CHECKING:
    import optuna

Metrics = Mapping[str, Any] | None
#: How many times a round may ask for a trial that the constraint or the strategy
#: rejects, per trial it needs, before it settles for fewer trials.
MAX_REJECTS_PER_TRIAL = 100
#: TPE's first round: its random start-up trials (Optuna's default count).
TPE_STARTUP = 10
#: A default TPE sweep runs in about this many rounds.
TPE_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Trial:
    """One combination to run: its index in the sweep and its swept params."""

    index: int
    params: dict[str, Scalar]


class TrialSource(Protocol):
    """The trials of a sweep, one round at a time."""

    #: How many trials the sweep plans to run (grid: the plan's size).
    planned: int
    #: Combinations left out: the constraint excluded them / the strategy rejects them.
    excluded: int
    invalid: int

    def next_round(self, results: Mapping[int, Metrics]) -> list[Trial] | None:
        """The next round's trials, after learning ``results`` (metrics by trial index,
        None for a failed trial) of the rounds before; None when the sweep is done."""


class GridSource:
    """Every combination of the grid plan, in one round."""

    def __init__(self, params: SweepParams) -> None:
        grid = plan(params)
        self._trials = [Trial(i, combo) for i, combo in enumerate(grid.combinations)]
        self.planned = len(self._trials)
        self.excluded = grid.excluded
        self.invalid = grid.invalid
        self.total_grid = grid.total
        self._given = False

    def next_round(self, results: Mapping[int, Metrics]) -> list[Trial] | None:
        """The whole grid once, then None."""
        if self._given:
            return None
        self._given = True
        return list(self._trials)


def round_sizes(params: SweepParams) -> list[int]:
    """The size of each round of a random or TPE sweep (they add up to ``max_tries``)."""
    total = params.max_tries or 0
    if params.method == "random":
        return [total]
    size = params.round_size or max(TPE_STARTUP, math.ceil(total / TPE_ROUNDS))
    sizes = [min(total, max(TPE_STARTUP, size))]
    while sum(sizes) < total:
        sizes.append(min(size, total - sum(sizes)))
    return sizes


class OptunaSource:
    """Trials asked of an Optuna sampler, told their objective value round by round."""

    def __init__(self, params: SweepParams, objective: Objective) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = params.random_state
        sampler: optuna.samplers.BaseSampler
        if params.method == "tpe":
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        self._optuna = optuna
        self._study = optuna.create_study(
            sampler=sampler, direction="minimize" if objective.minimize else "maximize"
        )
        self._objective = objective
        self._distributions = {name: _distribution(optuna, name, dim) for name, dim in params.space.items()}
        self._constraint = constraint_of(params)
        self._base = dict(params.strategy_params)
        from runner.backtest.strategies import get_strategy

        self._strategy = get_strategy(params.strategy)
        self._sizes = round_sizes(params)
        self._round = 0
        self._next_index = 0
        self._open: dict[int, optuna.trial.Trial] = {}
        self.planned = params.max_tries or 0
        self.excluded = 0
        self.invalid = 0

    def next_round(self, results: Mapping[int, Metrics]) -> list[Trial] | None:
        """Tell the open trials their results, then ask the next round (None after the last)."""
        for index in sorted(self._open):
            trial = self._open.pop(index)
            value = self._objective.value(results.get(index))
            if value is None:
                self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
            else:
                self._study.tell(trial, value)
        if self._round >= len(self._sizes):
            return None
        wanted = self._sizes[self._round]
        self._round += 1
        trials: list[Trial] = []
        rejects = 0
        while len(trials) < wanted and rejects < MAX_REJECTS_PER_TRIAL * wanted:
            asked = self._study.ask(self._distributions)
            combo: dict[str, Scalar] = dict(asked.params)
            if self._constraint is not None and not self._constraint.holds(combo):
                self.excluded += 1
            elif invalid_reason(self._strategy, combo, self._base) is not None:
                self.invalid += 1
            else:
                self._open[self._next_index] = asked
                trials.append(Trial(self._next_index, combo))
                self._next_index += 1
                continue
            rejects += 1
            # A rejected ask is told as failed: TPE then leaves that region alone.
            self._study.tell(asked, state=self._optuna.trial.TrialState.FAIL)
        self.planned -= wanted - len(trials)  # the space ran out of acceptable trials
        return trials or None


def _distribution(optuna: Any, name: str, dimension: Random | Range | Values) -> Any:
    if isinstance(dimension, Random):
        if dimension.kind == "int":
            return optuna.distributions.IntDistribution(int(dimension.low), int(dimension.high))
        return optuna.distributions.FloatDistribution(
            float(dimension.low), float(dimension.high), log=dimension.kind == "log"
        )
    return optuna.distributions.CategoricalDistribution(grid_values(name, dimension))


def trial_source(params: SweepParams, objective: Objective) -> TrialSource:
    """The trial source of a sweep's method."""
    if params.method == "grid":
        return GridSource(params)
    return OptunaSource(params, objective)
