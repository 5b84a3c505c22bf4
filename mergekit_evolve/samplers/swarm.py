"""Model Swarms (Feng et al., arXiv 2410.11163) as an Optuna sampler (``sampler: swarm``).

A particle is a coefficient vector over the experts' task vectors (the recipe's annotated
weights of a task_arithmetic, or normalize-free linear, recipe), so every particle is a
plain mergekit config. Utility: the weighted objective.

- Initial swarm: the experts (one-hot) plus pairwise crossovers ``w p1 + (1 - w) p2``,
  ``w ~ U[0, 2)``, of two members of the growing pool (experts and earlier crossovers, as the
  released code draws them), up to N particles; initial velocity ``x_j - x_i`` toward a random
  other j, from the positions the swarm starts at.
- Each iteration, with fresh ``r ~ U(0, 1)^4`` per particle:
  ``C = r_v phi_v + r_p phi_p + r_g phi_g + r_w phi_w``,
  ``v <- [r_v phi_v v + r_p phi_p (p - x) + r_g phi_g (g - x) - r_w phi_w (g_w - x)] / C``,
  ``x <- x + lambda v``, then ``lambda <- max(0.95 lambda, 0.1)``.
- A particle whose personal best has not improved for ``0.67 x patience`` iterations goes
  back to it with zero velocity. When the global best has not changed for ``patience``
  iterations (or after ``max_iterations``), the paper stops; here a fresh swarm starts, so
  the trial budget is spent (the study keeps every earlier particle).

Positions move in ``box`` (default [-5, 5]; the paper's are unbounded, ``box: null``), and
the recipe's weight ranges are widened to it (``with_box``: Optuna params must lie inside the
trial's ranges), so crossovers and moves extrapolate beyond the experts as in the paper. A
position outside the box is clipped there, and the particle's velocity is what it was computed.

``particle_kind: lora`` (``with_lora_particles``): the experts are LoRA adapters over the base and
a particle is the adapter ``sum_i c_i`` of theirs, factor by factor, as in the released code,
whose every swarm step is a weighted sum of adapters' tensors; the coefficients move exactly as
above, only the merge method changes (``lora_particle``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution

from mergekit_evolve.methods.lora_particle import METHOD as LORA_METHOD
from mergekit_evolve.methods.lora_particle import check_same_shape
from mergekit_evolve.recipe.evolve_settings import Objective
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.sampler_options import SwarmOptions
from mergekit_evolve.recipe.search_space import SearchSpace
from mergekit_evolve.samplers.coordinates import CoordinateError, ExpertWeights
from mergekit_evolve.samplers.generations import GenerationalSampler, Outcome, stream

LOG = logging.getLogger(__name__)
# `box: null` (the paper's unbounded positions) as a range Optuna can store: no swarm gets there
UNBOUNDED = 1e6


def box_of(options: SwarmOptions) -> tuple[float, float]:
    return options.box if options.box is not None else (-UNBOUNDED, UNBOUNDED)


def swarm_space(space: SearchSpace, options: SwarmOptions) -> SearchSpace:
    """``space`` with every expert weight's range widened to include the swarm's box."""
    low, high = box_of(options)
    experts = ExpertWeights(space, "swarm")
    wide = copy.deepcopy(space)
    for expert in experts.experts:
        for name in expert.dims:
            dim = wide.dimensions[name]
            wide.dimensions[name] = dataclasses.replace(dim, low=min(dim.low, low), high=max(dim.high, high))
    return wide


def with_box(recipe: Recipe, options: SwarmOptions) -> Recipe:
    """The recipe as the swarm searches it: its weights' ranges widened to the box."""
    return dataclasses.replace(recipe, search_space=swarm_space(recipe.search_space, options))


def with_lora_particles(recipe: Recipe) -> Recipe:
    """The recipe whose particles are LoRA adapters (``particle_kind: lora``): its task_arithmetic
    becomes ``lora_particle``, which adds the experts' A and B factors separately.

    Checked here, from the adapters' configs and file headers, before any weight loads: every model
    but the base is an expert ``base+adapter`` over the recipe's base, and all adapters share rank,
    alpha, target modules and factor shapes (AdapterError names the first that does not).
    """
    method = recipe.template.get("merge_method")
    if method == LORA_METHOD:
        return recipe
    if method != "task_arithmetic":
        raise CoordinateError(f"swarm particle_kind: lora replaces task_arithmetic over the base; "
                              f"the recipe's merge_method is {method!r}")
    params = dict(recipe.template.get("parameters") or {})
    others = sorted(k for k, v in params.items() if not (k == "normalize" or (k == "lambda" and v == 1)))
    if others:
        raise CoordinateError(f"swarm particle_kind: lora takes only per-model weights; "
                              f"remove the top-level parameters {others}")
    config = recipe.compile(recipe.search_space.default_point())
    experts = ExpertWeights(recipe.search_space, "swarm").references(config)
    base = config.base_model
    if base is None:
        raise CoordinateError("swarm particle_kind: lora adds the experts' adapters to the base: set base_model")
    plain = [str(m) for m in experts if m.lora is None or m.model != base.model]
    if plain:
        raise CoordinateError(
            f"swarm particle_kind: lora needs every expert to be a LoRA adapter over the base ({base}+ADAPTER); "
            f"'{plain[0]}' is not"
        )
    weights = [entry.parameters.get("weight") for entry in config.models or [] if entry.model in experts]
    if not all(isinstance(w, (int, float)) for w in weights):
        raise CoordinateError("swarm particle_kind: lora gives each expert one coefficient; "
                              "write each weight as one searched number")
    fixed = [str(m) for m in config.referenced_models() if m != base and m not in experts]
    if fixed:
        raise CoordinateError(f"swarm particle_kind: lora merges only the base and the experts; "
                              f"'{fixed[0]}' has no searched weight")
    check_same_shape([Path(m.lora.path) for m in experts])
    template = copy.deepcopy(recipe.template)
    template["merge_method"] = LORA_METHOD
    template.pop("parameters", None)  # normalize: false and lambda: 1 are what lora_particle does anyway
    return dataclasses.replace(recipe, template=template)


def velocity(
    v: np.ndarray, x: np.ndarray, p: np.ndarray, g: np.ndarray, g_w: np.ndarray,
    phi: tuple[float, float, float, float], r: np.ndarray,
) -> np.ndarray:
    """Model Swarms' velocity update for one particle; ``r`` is (r_v, r_p, r_g, r_w)."""
    terms = r * np.asarray(phi)
    c = terms.sum()
    return (terms[0] * v + terms[1] * (p - x) + terms[2] * (g - x) - terms[3] * (g_w - x)) / c


def initial_swarm(
    n_experts: int, size: int, rng: np.random.Generator, low: float = -np.inf, high: float = np.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """Experts plus crossovers of random pairs from the growing pool up to ``size``, each kept in
    [low, high]; velocities toward random others, from those positions."""
    x = [np.eye(n_experts)[j] for j in range(n_experts)]
    while len(x) < size:
        a, b = rng.choice(len(x), size=2, replace=False)
        w = rng.uniform(0.0, 2.0)
        x.append(np.clip(w * x[a] + (1 - w) * x[b], low, high))
    x = np.array(x)
    v = np.empty_like(x)
    for i in range(len(x)):
        j = rng.choice([k for k in range(len(x)) if k != i])
        v[i] = x[j] - x[i]
    return x, v


@dataclass
class Swarm:
    x: np.ndarray  # positions (particles x experts)
    v: np.ndarray
    p: np.ndarray  # personal bests
    p_utility: np.ndarray  # -inf until a particle has one
    step: float
    g: np.ndarray | None = None
    g_utility: float = -np.inf
    g_w: np.ndarray | None = None
    g_w_utility: float = np.inf
    started: bool = False  # the initial positions have been scored
    iterations: int = 0  # finished update steps
    since_best: int = 0  # iterations without a new global best
    stale: np.ndarray | None = None  # per particle: iterations without a new personal best


class SwarmSampler(GenerationalSampler):
    def __init__(
        self, distributions: dict[str, BaseDistribution], objectives: list[Objective], seed: int,
        options: SwarmOptions, experts: ExpertWeights,
    ):
        super().__init__(distributions, objectives, seed)
        self.options = options
        self.experts = experts
        self.low, self.high = box_of(options)
        wide_low, wide_high = experts.bounds()
        if (wide_low > self.low).any() or (wide_high < self.high).any():
            raise CoordinateError(
                f"swarm moves in [{self.low}, {self.high}] but the search space's weights span [{wide_low.min()}, "
                f"{wide_high.max()}]; load the recipe through prepare_recipe() (with_box widens them)"
            )
        self.swarm: Swarm | None = None  # None: the next generation starts a fresh swarm
        self.restarts = 0

    @property
    def phi(self) -> tuple[float, float, float, float]:
        o = self.options
        return o.phi_v, o.phi_p, o.phi_g, o.phi_w

    def _plan(self, generation: int) -> list[dict[str, Any]]:
        rng = stream(self._seed, generation)
        if self.swarm is None:
            x, v = initial_swarm(len(self.experts), max(self.options.particles, len(self.experts)), rng, self.low,
                                 self.high)
            self.swarm = Swarm(x, v, x.copy(), np.full(len(x), -np.inf), self.options.step, stale=np.zeros(len(x), int))
        else:
            self.move(self.swarm, rng)
        return [self.experts.params(x) for x in self.swarm.x]

    def move(self, s: Swarm, rng: np.random.Generator) -> None:
        """One update step of every particle (r drawn per particle, in particle order)."""
        for i in range(len(s.x)):
            g = s.g if s.g is not None else s.x[i]
            g_w = s.g_w if s.g_w is not None else s.x[i]
            s.v[i] = velocity(s.v[i], s.x[i], s.p[i], g, g_w, self.phi, rng.uniform(0.0, 1.0, 4))
            s.x[i] = np.clip(s.x[i] + s.step * s.v[i], self.low, self.high)
        s.step = max(self.options.step_decay * s.step, self.options.step_min)

    def _learn(self, generation: int, outcomes: list[Outcome]) -> None:
        s = self.swarm
        assert s is not None and s.stale is not None
        improved = False
        for i, outcome in enumerate(outcomes):
            u = outcome.utility
            if u is None or not np.isfinite(u):
                s.stale[i] += 1
                continue
            if u > s.p_utility[i]:
                s.p[i], s.p_utility[i], s.stale[i] = s.x[i].copy(), u, 0
            else:
                s.stale[i] += 1
            if u > s.g_utility:
                s.g, s.g_utility, improved = s.x[i].copy(), u, True
            if u < s.g_w_utility:
                s.g_w, s.g_w_utility = s.x[i].copy(), u
        if not s.started:
            s.started = True  # scoring the initial swarm is not an update step
            return
        s.iterations += 1
        s.since_best = 0 if improved else s.since_best + 1
        for i in np.flatnonzero(s.stale >= self.options.restart_fraction * self.options.patience):
            s.x[i], s.v[i], s.stale[i] = s.p[i], 0.0, 0
        if s.since_best >= self.options.patience or s.iterations >= self.options.max_iterations:
            self.restarts += 1
            LOG.info("swarm: restart %d after generation %d (best %.4g)", self.restarts, generation, s.g_utility)
            self.swarm = None
