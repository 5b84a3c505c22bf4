"""Model Swarms (Feng et al., arXiv 2410.11163) as an Optuna sampler (``sampler: swarm``).

A particle is a coefficient vector over the experts' task vectors (the recipe's annotated
weights of a task_arithmetic, or normalize-free linear, recipe), so every particle is a
plain mergekit config. Utility: the weighted objective.

- Initial swarm: the experts (one-hot) plus pairwise crossovers ``w p1 + (1 - w) p2``,
  ``w ~ U[0, 2)``, up to N particles; initial velocity ``x_j - x_i`` toward a random other j.
- Each iteration, with fresh ``r ~ U(0, 1)^4`` per particle:
  ``C = r_v phi_v + r_p phi_p + r_g phi_g + r_w phi_w``,
  ``v <- [r_v phi_v v + r_p phi_p (p - x) + r_g phi_g (g - x) - r_w phi_w (g_w - x)] / C``,
  ``x <- x + lambda v``, then ``lambda <- max(0.95 lambda, 0.1)``.
- A particle whose personal best has not improved for ``0.67 x patience`` iterations goes
  back to it with zero velocity. When the global best has not changed for ``patience``
  iterations (or after ``max_iterations``), the paper stops; here a fresh swarm starts, so
  the trial budget is spent (the study keeps every earlier particle).

Positions are clipped to the recipe's weight ranges (Optuna params must lie inside them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution

from mergekit_evolve.recipe.evolve_settings import Objective
from mergekit_evolve.recipe.sampler_options import SwarmOptions
from mergekit_evolve.samplers.coordinates import ExpertWeights
from mergekit_evolve.samplers.generations import GenerationalSampler, Outcome, stream

LOG = logging.getLogger(__name__)


def velocity(
    v: np.ndarray, x: np.ndarray, p: np.ndarray, g: np.ndarray, g_w: np.ndarray,
    phi: tuple[float, float, float, float], r: np.ndarray,
) -> np.ndarray:
    """Model Swarms' velocity update for one particle; ``r`` is (r_v, r_p, r_g, r_w)."""
    terms = r * np.asarray(phi)
    c = terms.sum()
    return (terms[0] * v + terms[1] * (p - x) + terms[2] * (g - x) - terms[3] * (g_w - x)) / c


def initial_swarm(n_experts: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Experts plus crossovers of random expert pairs up to ``size``; velocities toward random others."""
    x = [np.eye(n_experts)[j] for j in range(n_experts)]
    while len(x) < size:
        a, b = rng.choice(n_experts, size=2, replace=False)
        w = rng.uniform(0.0, 2.0)
        x.append(w * x[a] + (1 - w) * x[b])
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
        self.low, self.high = experts.bounds()
        self.swarm: Swarm | None = None  # None: the next generation starts a fresh swarm
        self.restarts = 0

    @property
    def phi(self) -> tuple[float, float, float, float]:
        o = self.options
        return o.phi_v, o.phi_p, o.phi_g, o.phi_w

    def _plan(self, generation: int) -> list[dict[str, Any]]:
        rng = stream(self._seed, generation)
        if self.swarm is None:
            x, v = initial_swarm(len(self.experts), max(self.options.particles, len(self.experts)), rng)
            x = np.clip(x, self.low, self.high)
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
