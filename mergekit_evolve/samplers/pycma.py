"""pycma's CMA-ES as an Optuna sampler (``sampler: cma``), one generation at a time.

Each generation is ``es.ask()``; its points go to trials one by one, and ``es.tell`` gets the
whole generation once every member has finished (failed members rank last). Coordinates are
the unit cube over the numeric dimensions (``bounds [0, 1]``, ``sigma0`` in units of each
range, Sakana's 1/6 by default), started from the recipe's init values, else mid-range.

pycma draws from its own ``RandomState`` (option ``randn``) seeded by ``evolve.seed``, never
from numpy's global stream, so replaying the study's generations rebuilds the same ``es`` in
a resumed run. Restarts (``restarts: N``) follow ``cma.fmin``: IPOP doubles the population
(``incpopsize``) each time; BIPOP interleaves runs with a small population and a smaller
step whenever those have used fewer evaluations than the large ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import cma
import numpy as np
from optuna.distributions import BaseDistribution

from mergekit_evolve.recipe.evolve_settings import Objective
from mergekit_evolve.recipe.sampler_options import PyCmaOptions
from mergekit_evolve.samplers.coordinates import UnitBox
from mergekit_evolve.samplers.generations import GenerationalSampler, Outcome, stream

LOG = logging.getLogger(__name__)


@dataclass
class _Run:
    """One CMA-ES run between restarts."""

    es: cma.CMAEvolutionStrategy
    kind: str  # "first", "large" or "small" (BIPOP's regimes)
    sigma0: float
    evaluations: int = 0
    asked: list[np.ndarray] = field(default_factory=list)


class PyCmaSampler(GenerationalSampler):
    def __init__(
        self, distributions: dict[str, BaseDistribution], objectives: list[Objective], seed: int,
        options: PyCmaOptions, init: dict[str, Any],
    ):
        super().__init__(distributions, objectives, seed)
        self.box = UnitBox(distributions)
        self.options = options
        self._x0 = self.box.encode(init, missing=0.5)  # the recipe's init values, else the middle of each range
        self._restart_rng = stream(seed, 1)  # restart points and BIPOP draws
        self._restarts = 0
        self._evaluations = {"small": 0, "large": 0}
        self._large_runs = 0
        self._popsize0: int | None = None
        self._maxiter0: float | None = None
        self.runs = [_Run(self._new_es(self._x0, options.sigma0, options.popsize, None), "first", options.sigma0)]

    def _new_es(self, x0: np.ndarray, sigma0: float, popsize: int | None,
                maxiter: float | None) -> cma.CMAEvolutionStrategy:
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "seed": np.nan,  # leave numpy's global stream alone; draw from ours:
            "randn": np.random.RandomState(
                np.random.MT19937(stream(self._seed, 2, self._restarts).integers(2**32))).randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        if popsize:
            opts["popsize"] = popsize
        if maxiter:
            opts["maxiter"] = maxiter
        return cma.CMAEvolutionStrategy(list(x0), sigma0, opts)

    @property
    def run(self) -> _Run:
        return self.runs[-1]

    @property
    def popsize(self) -> int:
        return int(self.run.es.popsize)

    def _plan(self, generation: int) -> list[dict[str, Any]]:
        self.run.asked = [np.asarray(x) for x in self.run.es.ask()]
        return [self.box.decode(x) for x in self.run.asked]

    def _learn(self, generation: int, outcomes: list[Outcome]) -> None:
        fitness = self.fitness([o.utility for o in outcomes])
        self.run.es.tell(self.run.asked, fitness)
        self.run.evaluations += len(outcomes)
        if self._popsize0 is None:
            self._popsize0, self._maxiter0 = self.popsize, self.run.es.opts["maxiter"]
        stop = self.run.es.stop()
        if stop and self._restarts < self.options.restarts:
            LOG.info("cma: restart %d after generation %d (%s)", self._restarts + 1, generation, ", ".join(stop))
            self._restart()

    @staticmethod
    def fitness(utilities: list[float | None]) -> list[float]:
        """pycma minimises: the negated utility; a failed member ranks below the worst that finished."""
        finished = [u for u in utilities if u is not None]
        worst = min(finished) - 1.0 if finished else 0.0
        return [-(u if u is not None else worst) for u in utilities]

    def _restart(self) -> None:
        """A new run from a random point, sized as ``cma.fmin`` sizes IPOP/BIPOP restarts."""
        opts = self.options
        assert self._popsize0 is not None and self._maxiter0 is not None
        # the first run is accounted as a small one, as in cma.fmin
        self._evaluations["large" if self.run.kind == "large" else "small"] += self.run.evaluations
        self._restarts += 1
        x0 = self._restart_rng.uniform(0.0, 1.0, len(self.box))
        large = self._evaluations["large"]
        if opts.restart_strategy == "bipop" and self._evaluations["small"] < max(1, large):
            sigma0 = opts.sigma0 * 0.01 ** self._restart_rng.uniform()  # a local search
            growth = opts.incpopsize**self._large_runs
            popsize = max(2, int(self._popsize0 * growth ** (self._restart_rng.uniform() ** 2)))
            maxiter = min(self._maxiter0, 0.5 * large / popsize)
            self.runs.append(_Run(self._new_es(x0, sigma0, popsize, maxiter), "small", sigma0))
        else:
            self._large_runs += 1
            popsize = int(self._popsize0 * opts.incpopsize**self._large_runs + 0.5)
            self.runs.append(_Run(self._new_es(x0, opts.sigma0, popsize, self._maxiter0), "large", opts.sigma0))
