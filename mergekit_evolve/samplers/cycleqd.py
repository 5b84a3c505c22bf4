"""CycleQD (Sakana AI, arXiv 2410.14735) as an Optuna sampler (``sampler: cycleqd``).

An individual's task vector is ``mutation(sum_j c_j tau_j + sum_t m_t tau_t)``: coefficients
``c`` over the experts' task vectors (the recipe's annotated weights), plus the mutated
ancestors ``t`` it inherits with coefficients ``m``, then at most one seeded mutation of its own.
It compiles to an ``svd_mutation`` (or ``gaussian_mutation``) config, a plain mergekit config of
this package's plugin methods whose ``lineage`` parameter names those ancestors (their own
coefficients, ancestors and seeds), so any elite is rebuilt from the experts' weights alone:
``merge --trial`` and ``export`` replay it, no intermediate checkpoint is needed.

- Generation 0 evaluates the experts (coefficient 1 on one, 0 on the others), and each is
  offered to every archive (with ``bounds_from_experts``, their scores first set the bins).
- Generation g >= 1 works on task q = (g - 1) mod K: ``children`` times, two parents are drawn
  from archive q (elite sampling or uniform), crossed over as
  ``tau_c = (w1 tau_p1 + w2 tau_p2) / (w1 + w2)`` with ``w_i ~ N(mu, sigma^2)`` on the parents'
  whole task vectors (a mutated parent's mutation is inherited; an unmutated one is linear in
  its own terms, which are folded in), and mutated with a fresh seed. Every child is scored on
  all K tasks and offered to every archive.
- After each full cycle (when ``merge_elites``), the generation also holds the paper's final
  model: ``theta_base + sum_k beta_k tau_k`` over each archive's best elite (mutations
  included), ``beta = softmax(f_k)``; it is a trial like any other, so it wins when it scores best.

A child's own expert coefficients are clipped to the recipe's ranges (they are Optuna params).
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
from mergekit.config import MergeConfiguration
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
    if options.mutation == "none" or SEED_DIM in recipe.search_space.dimensions:
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
    space = copy.deepcopy(recipe.search_space)
    if options.mutation == "svd" and options.w_min:
        params["w_min"] = options.w_min  # fixed for the run: only the seed and w_max vary
    for dim, param in zip(dims, ("seed", scale_param), strict=False):
        params[param] = {"search": [dim.low, dim.high]}
        space.dimensions[dim.name] = dim
        space.placements.append(Placement(("parameters", param), (dim.name,)))
    return dataclasses.replace(recipe, template=template, search_space=space)


def crossover(c1: np.ndarray, c2: np.ndarray, w1: float, w2: float) -> np.ndarray:
    """CycleQD's merge crossover on coefficients: ``(w1 c1 + w2 c2) / (w1 + w2)``."""
    return (w1 * c1 + w2 * c2) / (w1 + w2)


def softmax(f: np.ndarray) -> np.ndarray:
    e = np.exp(f - f.max())
    return e / e.sum()


Mix = tuple[tuple[int, float], ...]  # (ancestor trial, coefficient) of mutated ancestors


def combine(parents: list[tuple[Elite, float]], n_experts: int) -> tuple[np.ndarray, Mix]:
    """``sum_k a_k tau(parent_k)`` as (expert coefficients, mix): an unmutated parent is linear in its
    own terms and is folded in; a mutated one is kept whole, as an ancestor."""
    coefficients = np.zeros(n_experts)
    mix: dict[int, float] = {}
    for elite, a in parents:
        if elite.mutation is None:
            coefficients = coefficients + a * np.array(elite.coefficients)
            for t, c in elite.mix:
                mix[t] = mix.get(t, 0.0) + a * c
        else:
            mix[elite.trial] = mix.get(elite.trial, 0.0) + a
    return coefficients, tuple(sorted(mix.items()))


def experts_bounds(qualities: list[dict[str, float]], factors: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """The paper's bins: from a x the weakest expert's score to b x the strongest, per task
    (for negative scores the same margins, so the range still holds every expert)."""
    a, b = factors
    out = {}
    for task in qualities[0]:
        low, high = min(q[task] for q in qualities), max(q[task] for q in qualities)
        low, high = low - (1 - a) * abs(low), high + (b - 1) * abs(high)
        out[task] = (low, high) if low < high else (low - 0.5, high + 0.5)
    return out


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
            Archive(t, [d for d in self.tasks if d != t], options.bins, dict(bounds)) for t in self.tasks
        ]
        self.merged: list[int] = []  # trials that held the merged elites
        self._merge_slots: set[tuple[int, int]] = set()
        self._mixes: dict[tuple[int, int], Mix] = {}  # (generation, index) -> the ancestors that member inherits
        self.individuals: dict[int, Elite] = {}  # trial -> its definition (qualities empty when it failed)

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
        plan = []
        for index in range(self.options.children):
            coefficients, mutation, mix = self.child(archive, rng)
            self._mixes[(generation, index)] = mix
            plan.append(self._params(coefficients, mutation))
        if self.options.merge_elites and self.quality_task(generation) == self.cycle - 1:
            merged = self.merged_elites()
            if merged is not None:
                self._merge_slots.add((generation, len(plan)))
                self._mixes[(generation, len(plan))] = merged[1]
                plan.append(self._params(merged[0], None))
        return plan

    def parents(self, archive: Archive, rng: np.random.Generator) -> tuple[Elite, Elite]:
        elites = archive.elites()
        if not elites:  # every expert failed in this archive: start from the experts
            a, b = rng.choice(len(self.experts), size=2, replace=len(self.experts) < 2)
            return self._expert(int(a)), self._expert(int(b))
        probs = (elite_probabilities(elites, self.tasks, self.options.elite_slope) if self.options.elite_sampling
                 else None)
        i, j = rng.choice(len(elites), size=2, replace=len(elites) < 2, p=probs)
        return elites[int(i)], elites[int(j)]

    def _expert(self, j: int) -> Elite:
        return Elite(-1, tuple(self.experts.one_hot(j)), None, {})

    def child(self, archive: Archive, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, float] | None, Mix]:
        """Parents, crossover weights and mutation seed are drawn in that order from ``rng``."""
        p1, p2 = self.parents(archive, rng)
        w1, w2 = rng.normal(self.options.crossover_mu, self.options.crossover_sigma, size=2)
        if abs(w1 + w2) < 1e-6:  # the weighted mean is undefined; take the plain mean
            w1 = w2 = 1.0
        a1, a2 = float(w1 / (w1 + w2)), float(w2 / (w1 + w2))
        coefficients, mix = combine([(p1, a1), (p2, a2)], len(self.experts))
        low, high = self.experts.bounds()
        coefficients = np.clip(coefficients, low, high)
        mutation = None
        if self.mutation_dims:
            scale = self.options.w_max if self.options.mutation == "svd" else self.options.noise
            mutation = (int(rng.integers(0, SEED_HIGH)), scale)
        return coefficients, mutation, mix

    def merged_elites(self) -> tuple[np.ndarray, Mix] | None:
        """``sum_k beta_k tau_k`` over each archive's best elite, ``beta = softmax(f_k)``."""
        best = [(a.best(), a.task) for a in self.archives]
        best = [(e, t) for e, t in best if e is not None]
        if not best:
            return None
        beta = softmax(np.array([e.qualities[t] for e, t in best]))
        return combine([(e, float(b)) for b, (e, _) in zip(beta, best, strict=False)], len(self.experts))

    def _params(self, coefficients: np.ndarray, mutation: tuple[int, float] | None) -> dict[str, Any]:
        params: dict[str, Any] = self.experts.params(coefficients)
        if self.mutation_dims:
            seed_dim, scale_dim = self.mutation_dims
            params[seed_dim], params[scale_dim] = mutation if mutation else (0, 0.0)
        return params

    # -- the config a member compiles to --------------------------------------------------

    def inherits(self, trial: optuna.Trial) -> Mix:
        """The mutated ancestors (trial, coefficient) the member ``trial`` holds inherits."""
        member = self.member_of(trial)
        return self._mixes.get(member, ()) if member is not None else ()

    def extend_config(self, trial: optuna.Trial, config: MergeConfiguration) -> MergeConfiguration:
        """``config`` with the ``lineage`` of the member ``trial`` holds: the mutated ancestors it inherits."""
        mix = self.inherits(trial)
        if not mix:
            return config
        models = self.experts.models_in(config)
        nodes: dict[str, Any] = {}
        todo = [t for t, _ in mix]
        while todo:
            t = todo.pop()
            if f"t{t}" in nodes:
                continue
            e = self.individuals[t]
            nodes[f"t{t}"] = {
                "weights": {m: c for m, c in zip(models, e.coefficients, strict=False) if c},
                "mix": [[f"t{u}", c] for u, c in e.mix],
                "mutation": list(e.mutation) if e.mutation else None,
            }
            todo.extend(u for u, _ in e.mix)
        lineage = json.dumps({"mix": [[f"t{t}", c] for t, c in mix], "nodes": nodes}, sort_keys=True)
        return config.model_copy(update={"parameters": {**(config.parameters or {}), "lineage": lineage}})

    # -- learning ------------------------------------------------------------------------

    def _learn(self, generation: int, outcomes: list[Outcome]) -> None:
        if generation == 0 and self.options.bounds_from_experts:
            scored = [o.qualities for o in outcomes if o.qualities is not None]
            if scored:
                bounds = experts_bounds(scored, self.options.bounds_from_experts)
                for archive in self.archives:
                    archive.bounds = dict(bounds)
        for index, outcome in enumerate(outcomes):
            if (generation, index) in self._merge_slots:
                self.merged.append(outcome.trial)
            elite = Elite(
                outcome.trial, tuple(float(c) for c in self.experts.coefficients(outcome.params)),
                self._mutation_of(outcome.params), outcome.qualities or {}, self._mixes.get((generation, index), ()),
            )
            self.individuals[outcome.trial] = elite
            if outcome.qualities is None:
                continue
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
