"""Generation-based algorithms behind Optuna's ``BaseSampler``: plan a generation, hand it out, learn.

A subclass plans generation g as a list of points (Optuna params) and learns from the
generation's outcomes once every member has finished. Each trial that takes a member is
tagged with ``[g, index]`` in its system attrs; everything else is rebuilt from the study.
The algorithm's state is therefore a pure function of the seed and the finished trials: a
resumed run, or another worker process on the same storage, replays the study to the same
state (``_plan`` must draw only from streams seeded by the seed and g, or from state built
by earlier ``_learn`` calls).

A member counts as finished when one of its trials completed, or failed with an error
(the worker records one), or was pruned, or was lost twice (a Ctrl-C or a dead worker,
which leave no error). A lost member is handed out again.
"""

from __future__ import annotations

import abc
import logging
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from mergekit_evolve.compat.optuna import heartbeat_enabled, set_trial_system_attr
from mergekit_evolve.evaluate.scores import qualities, weighted
from mergekit_evolve.recipe.evolve_settings import Objective

LOG = logging.getLogger(__name__)
MEMBER_ATTR = "mergekit_evolve:member"
LOST_LIMIT = 2
POLL_SECONDS = 2.0


def stream(seed: int, *keys: int) -> np.random.Generator:
    """A random stream determined by the run's seed and ``keys`` (e.g. the generation)."""
    return np.random.default_rng([seed % 2**32, *keys])


@dataclass(frozen=True)
class Outcome:
    """How one member of a generation did; ``utility`` is None when it failed or was pruned."""

    trial: int
    params: dict[str, Any]
    utility: float | None
    qualities: dict[str, float] | None


class GenerationalSampler(BaseSampler, abc.ABC):
    def __init__(self, distributions: dict[str, BaseDistribution], objectives: list[Objective], seed: int):
        self._distributions = dict(distributions)
        self._objectives = objectives
        self._seed = seed
        self._independent = RandomSampler(seed=seed)
        self._plans: dict[int, list[dict[str, Any]]] = {}
        self._learned = 0  # generations whose outcomes have been learned
        self._handed: dict[int, tuple[int, int]] = {}  # trial number -> the member it took

    @abc.abstractmethod
    def _plan(self, generation: int) -> list[dict[str, Any]]:
        """The points of ``generation``, called once per generation, in order."""

    @abc.abstractmethod
    def _learn(self, generation: int, outcomes: list[Outcome]) -> None:
        """Update the state from a finished generation (outcomes in plan order)."""

    # -- Optuna's interface --------------------------------------------------------------

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, dist: BaseDistribution) -> Any:
        return self._independent.sample_independent(study, trial, name, dist)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        # enqueued points (a recipe's init, a heartbeat retry that kept its member tag) keep their params
        if not search_space or "fixed_params" in trial.system_attrs or MEMBER_ATTR in trial.system_attrs:
            return {}
        while True:
            generation, index = self.sync(study)
            if index is not None:
                break
            # every member is out and unfinished (other workers): wait, unless nothing ever marks a dead one
            if not heartbeat_enabled(study):
                index = self._oldest_unfinished(study, generation)
                break
            time.sleep(POLL_SECONDS)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)  # a dead worker's member becomes free again
        set_trial_system_attr(study, trial, MEMBER_ATTR, [generation, index])
        self._handed[trial.number] = (generation, index)
        return dict(self._plan_of(generation)[index])

    def member_of(self, trial: optuna.Trial) -> tuple[int, int] | None:
        """The (generation, index) ``trial`` holds: handed out here, or (a retry) read from the study."""
        if trial.number not in self._handed:
            frozen = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number), None)
            tag = frozen.system_attrs.get(MEMBER_ATTR) if frozen is not None else None
            if tag is None:
                return None
            self._handed[trial.number] = (int(tag[0]), int(tag[1]))
            self._plan_of(int(tag[0]))  # its plan (and what the plan records) exists in this process too
        return self._handed[trial.number]

    # -- replay --------------------------------------------------------------------------

    def _plan_of(self, generation: int) -> list[dict[str, Any]]:
        if generation not in self._plans:
            self._plans[generation] = self._plan(generation)
        return self._plans[generation]

    def sync(self, study: optuna.Study) -> tuple[int, int | None]:
        """Learn every finished generation; return the current one and a member nobody holds (or None)."""
        members = _members(study.get_trials(deepcopy=False))
        while True:
            generation = self._learned
            plan = self._plan_of(generation)
            status = [_status(members.get((generation, i), [])) for i in range(len(plan))]
            if all(s == "finished" for s in status):
                self._learn(generation, [self._outcome(members[(generation, i)]) for i in range(len(plan))])
                self._learned += 1
                continue
            free = [i for i, s in enumerate(status) if s == "free"]
            return generation, (free[0] if free else None)

    def _oldest_unfinished(self, study: optuna.Study, generation: int) -> int:
        members = _members(study.get_trials(deepcopy=False))
        running = [i for i in range(len(self._plan_of(generation)))
                   if _status(members.get((generation, i), [])) == "running"]
        return min(running, key=lambda i: min(t.number for t in members[(generation, i)]))

    def _outcome(self, trials: list[FrozenTrial]) -> Outcome:
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        t = done[0] if done else trials[-1]
        return Outcome(t.number, dict(t.params), weighted(t, self._objectives), qualities(t, self._objectives))


def _members(trials: Sequence[FrozenTrial]) -> dict[tuple[int, int], list[FrozenTrial]]:
    out: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
    for t in sorted(trials, key=lambda t: t.number):
        tag = t.system_attrs.get(MEMBER_ATTR)
        if tag is not None:
            out[(int(tag[0]), int(tag[1]))].append(t)
    return out


def _status(trials: list[FrozenTrial]) -> str:
    states = [t.state for t in trials]
    if TrialState.COMPLETE in states or TrialState.PRUNED in states:
        return "finished"
    if any(t.state == TrialState.FAIL and t.user_attrs.get("error") for t in trials):
        return "finished"
    if TrialState.RUNNING in states or TrialState.WAITING in states:
        return "running"
    return "finished" if states.count(TrialState.FAIL) >= LOST_LIMIT else "free"
