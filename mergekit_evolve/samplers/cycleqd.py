"""CycleQD (Sakana AI, arXiv 2410.14735) as an Optuna sampler (``sampler: cycleqd``).

An individual is a coefficient vector over the experts' task vectors (the recipe's annotated
weights) plus at most one seeded mutation; it compiles to an ``svd_mutation`` (or
``gaussian_mutation``) config, a plain mergekit config of this package's plugin methods.

- Generation 0 evaluates the experts (coefficient 1 on one, 0 on the others), and each is
  offered to every archive.
- Generation g >= 1 works on task q = (g - 1) mod K: ``children`` times, two parents are drawn
  from archive q (elite sampling or uniform), crossed over as
  ``c = (w1 c_p1 + w2 c_p2) / (w1 + w2)`` with ``w_i ~ N(mu, sigma^2)``, and mutated with a
  fresh seed. Every child is scored on all K tasks and offered to every archive.
- After each full cycle (when ``merge_elites``), the generation also holds the final-model
  candidate: ``sum_k beta_k c_k`` over each archive's best elite, ``beta = softmax(f_k)``.

Where this differs from the paper, and why: the crossover acts on the parents' coefficients,
so a parent's own mutation is not inherited (mutation is nonlinear; carrying it would make a
child's config grow with its ancestry), and the merged final model likewise combines the
elites' coefficients without their mutations. Children are clipped to the recipe's ranges.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

from mergekit_evolve.recipe.evolve_settings import Objective
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.sampler_options import CycleQDOptions
from mergekit_evolve.recipe.search_space import Dimension, Placement
from mergekit_evolve.runfolder import RunFolder
from mergekit_evolve.samplers.archive import Archive, Elite, elite_probabilities
from mergekit_evolve.samplers.coordinates import ExpertWeights
from mergekit_evolve.samplers.generations import GenerationalSampler, Outcome, stream

LOG = logging.getLogger(__name__)
SEED_DIM = "mutation.seed"
MUTATION_METHODS = {"svd": ("svd_mutation", "w_max"), "gaussian": ("gaussian_mutation", "noise")}
SEED_HIGH = 2**31 - 1


def mutation_dims(options: CycleQDOptions) -> tuple[str, ...]:
    if options.mutation == "none":
        return ()
    return SEED_DIM, f"mutation.{MUTATION_METHODS[options.mutation][1]}"


def with_mutation(recipe: Recipe, options: CycleQDOptions) -> Recipe:
    """The recipe whose candidates carry CycleQD's mutation: the plugin method and two more dimensions."""
    if options.mutation == "none" or SEED_DIM in recipe.space.dimensions:
        return recipe
    method, scale_param = MUTATION_METHODS[options.mutation]
    scale = options.w_max if options.mutation == "svd" else options.noise
    template = copy.deepcopy(recipe.template)
    template["merge_method"] = method
    params = template.setdefault("parameters", {})
    for key in ("normalize", "lambda"):  # task_arithmetic's defaults, already checked to be unset or default
        params.pop(key, None)
    dims = [
        Dimension(SEED_DIM, "int", low=0, high=SEED_HIGH),
        Dimension(f"mutation.{scale_param}", "float", low=0.0, high=scale),
    ]
    space = copy.deepcopy(recipe.space)
    for dim, param in zip(dims, ("seed", scale_param)):
        params[param] = {"search": [dim.low, dim.high]}
        space.dimensions[dim.name] = dim
        space.placements.append(Placement(("parameters", param), (dim.name,)))
    return dataclasses.replace(recipe, template=template, space=space)


def crossover(c1: np.ndarray, c2: np.ndarray, w1: float, w2: float) -> np.ndarray:
    """CycleQD's merge crossover on coefficients: ``(w1 c1 + w2 c2) / (w1 + w2)``."""
    return (w1 * c1 + w2 * c2) / (w1 + w2)


def softmax(f: np.ndarray) -> np.ndarray:
    e = np.exp(f - f.max())
    return e / e.sum()


class CycleQDSampler(GenerationalSampler):
    def __init__(
        self, distributions: dict[str, BaseDistribution], objectives: list[Objective], seed: int,
        options: CycleQDOptions, experts: ExpertWeights,
    ):
        super().__init__(distributions, objectives, seed)
        self.options = options
        self.experts = experts
        self.tasks = [o.name for o in objectives]
        self.mutation_dims = mutation_dims(options)
        bounds = {t: options.bounds_of(t) for t in self.tasks}
        self.archives = [
            Archive(t, [d for d in self.tasks if d != t], options.bins, bounds) for t in self.tasks
        ]
        self.merged: list[int] = []  # trials that held the merged elites
        self._merge_slots: set[tuple[int, int]] = set()

    @property
    def cycle(self) -> int:
        return len(self.tasks)

    def quality_task(self, generation: int) -> int:
        """The archive generation ``generation`` (>= 1) breeds from: q = g mod K over evolution steps."""
        return (generation - 1) % self.cycle

    # -- planning ------------------------------------------------------------------------

    def _plan(self, generation: int) -> list[dict[str, Any]]:
        if generation == 0:
            return [self._params(self.experts.one_hot(j), None) for j in range(len(self.experts))]
        rng = stream(self._seed, generation)
        archive = self.archives[self.quality_task(generation)]
        plan = [self._params(*self.child(archive, rng)) for _ in range(self.options.children)]
        if self.options.merge_elites and self.quality_task(generation) == self.cycle - 1:
            merged = self.merged_elites()
            if merged is not None:
                self._merge_slots.add((generation, len(plan)))
                plan.append(self._params(merged, None))
        return plan

    def parents(self, archive: Archive, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        elites = archive.elites()
        if not elites:  # every expert failed in this archive: start from the experts
            a, b = rng.choice(len(self.experts), size=2, replace=len(self.experts) < 2)
            return self.experts.one_hot(int(a)), self.experts.one_hot(int(b))
        probs = elite_probabilities(elites, self.tasks) if self.options.elite_sampling else None
        i, j = rng.choice(len(elites), size=2, replace=len(elites) < 2, p=probs)
        return np.array(elites[int(i)].coefficients), np.array(elites[int(j)].coefficients)

    def child(self, archive: Archive, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, float] | None]:
        """Parents, crossover weights and mutation seed are drawn in that order from ``rng``."""
        p1, p2 = self.parents(archive, rng)
        w1, w2 = rng.normal(self.options.crossover_mu, self.options.crossover_sigma, size=2)
        if abs(w1 + w2) < 1e-6:  # the weighted mean is undefined; take the plain mean
            w1 = w2 = 1.0
        low, high = self.experts.bounds()
        coefficients = np.clip(crossover(p1, p2, float(w1), float(w2)), low, high)
        mutation = None
        if self.mutation_dims:
            scale = self.options.w_max if self.options.mutation == "svd" else self.options.noise
            mutation = (int(rng.integers(0, SEED_HIGH)), scale)
        return coefficients, mutation

    def merged_elites(self) -> np.ndarray | None:
        """``sum_k beta_k c_k`` over each archive's best elite, ``beta = softmax(f_k)``."""
        best = [(a.best(), a.task) for a in self.archives]
        best = [(e, t) for e, t in best if e is not None]
        if not best:
            return None
        beta = softmax(np.array([e.qualities[t] for e, t in best]))
        return sum(b * np.array(e.coefficients) for b, (e, _) in zip(beta, best))

    def _params(self, coefficients: np.ndarray, mutation: tuple[int, float] | None) -> dict[str, Any]:
        params: dict[str, Any] = self.experts.params(coefficients)
        if self.mutation_dims:
            seed_dim, scale_dim = self.mutation_dims
            params[seed_dim], params[scale_dim] = mutation if mutation else (0, 0.0)
        return params

    # -- learning ------------------------------------------------------------------------

    def _learn(self, generation: int, outcomes: list[Outcome]) -> None:
        for index, outcome in enumerate(outcomes):
            if (generation, index) in self._merge_slots:
                self.merged.append(outcome.trial)
            if outcome.qualities is None:
                continue
            elite = Elite(
                outcome.trial, tuple(float(c) for c in self.experts.coefficients(outcome.params)),
                self._mutation_of(outcome.params), outcome.qualities,
            )
            for archive in self.archives:
                archive.offer(elite)

    def _mutation_of(self, params: dict[str, Any]) -> tuple[int, float] | None:
        if not self.mutation_dims or not params.get(self.mutation_dims[1]):
            return None
        return int(params[self.mutation_dims[0]]), float(params[self.mutation_dims[1]])

    # -- run folder ----------------------------------------------------------------------

    def write_run_files(self, run_dir: Path, study: optuna.Study) -> None:
        """``archives.json``: every archive's elites, rebuilt from the study (so a resume has them too)."""
        self.sync(study)
        data = {
            "generations": self._learned,
            "experts": [e.label for e in self.experts.experts],
            "mutation": self.options.mutation,
            "archives": [a.to_json() for a in self.archives],
            "merged_elites_trials": self.merged,
        }
        path = RunFolder(run_dir).archives
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)
