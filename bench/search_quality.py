"""Search quality where search matters: the samplers at equal trial budgets on a weight-space problem
whose best merge is far from the middle of the box, over several seeds.

    python bench/search_quality.py [--trials 60] [--seeds 0 1 2 3 4] [--methods ...] [--markdown OUT.md]

The problem (synthetic, CPU, milliseconds a candidate; no lm-eval): ``--experts`` experts are a
random base plus random task vectors, ``--layers`` square matrices each. Two tasks, ``a`` and
``b``; each has a hidden target model: the base plus a per-layer mix of the experts' task vectors
(in each layer one expert at 0.95 and the others at 0.05, the leading expert changing across the
layers in each task's own order: no single coefficient per expert fits every layer),
with each layer's singular values then rescaled by a factor in [0.7, 1.3] (so only a mutation
that rescales singular values, CycleQD's SVD mutation, can leave the experts' span towards it).
A candidate's score on a task is ``1 / (1 + err)``, ``err`` the relative squared error of its layers'
outputs against the target's on that split's inputs (``--inputs`` random vectors a split: the
search split and the held-out split differ). The searched objective is the mean over the tasks.

What each method searches, as a recipe would let it:

- ``random``, ``tpe``, ``cmaes`` (Optuna, unpruned), ``cma`` (pycma): a gradient weight per expert,
  ``--points`` control points interpolated over the layers (experts x points dimensions), in [0, 1];
- ``cycleqd*``, ``swarm*``: one coefficient per expert (their individuals are expert mixtures),
  CycleQD with the package's SVD mutation (rebuilt here in numpy: the same formula and
  inheritance, a numpy random stream instead of torch's) and lineage, from the sampler's own record.

Reported per method: the winner's (best search score's) held-out score, mean and 95% interval
(Student t) over the seeds; trials until the incumbent reaches 95% of the best search score any
method found on that seed (median, and how many seeds reached it). Ablations: ``cycleqd_nomut``
and ``cycleqd_paper_nomut`` (CycleQD without mutation), ``cycleqd_paper``/``swarm_paper``
(``preset: paper``),
``swarm_clip`` (positions clipped to [0, 1], the old behaviour).

``--section routing``: the data flow space, on a problem where a path through two models beats
either. Models ``A`` and ``B`` are ``--route-layers`` residual MLP layers each
(``h += s * V tanh(U h)``), fine-tunes of one random base. The target is a path of
``--route-layers`` hops through both, as DFS could pick it (slots of the layout repeated twice),
with a random scale on every hop and on the embedding. A candidate is decoded by the package's own
``routing.decode`` (the paper's indicator, W and the embedding's scale) and scored ``1 / (1 + err)``
on each split's inputs. pycma from the paper's start (``sigma0`` 0.05, as the paper recipes) runs:
``dfs`` (indicator and W), ``dfs_w1`` (the indicator alone, W = 1), ``ps`` (a per-layer mix of A
and B, the parameter space), ``ps_dfs`` (``ps``'s winner, then DFS over it and B: twice the trials).

``--section fitness``: the cheap-fitness modes on the weights problem, at an equal budget of examples
scored (``--budget`` whole-split evaluations: one example of one task is one forward pass in a real run).
The search split has ``--fitness-inputs`` examples (the held-out split 4,096) and a task's score is
the mean of its examples' results, so slices and anchors estimate it as they estimate an lm-eval mean.
An example's error weighs the layers by its own Dirichlet weights, so it leans on a few layers and favours
the experts that own them. ``--metric acc`` (the default): an example is right (1) or wrong (0),
right when its ``1 / (1 + err_i)`` (``err_i`` its relative squared error) clears the example's
difficulty, drawn once in [0.3, 0.7]: as noisy from example to example as a benchmark's questions.
``--metric score``: the ``1 / (1 + err_i)`` itself, which varies little between examples.
Candidates are scored by the package's own staged scoring
(``study.pruning.staged_scores``: its rungs, Optuna's pruners as ``pruning: auto`` resolves them) and
anchors (``evaluate.anchors.choose_anchors`` on the sources' results, the sources' scoring charged to the
budget); with estimates as values the best ``finalists`` distinct candidates are re-scored on the whole
search split, charged too. A candidate's examples are scored once (as the run folder's example store).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from scipy import stats

from mergekit_evolve.evaluate.anchors import AnchorSet, choose_anchors
from mergekit_evolve.evaluate.scores import Scores, study_values
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.routing import Hop, Routing, add_dimensions, decode
from mergekit_evolve.recipe.sampler_options import CycleQDOptions, SwarmOptions
from mergekit_evolve.recipe.search_space import Dimension, Placement, SearchSpace
from mergekit_evolve.samplers.cycleqd import CycleQDSampler, mutation_dims
from mergekit_evolve.samplers.registry import make_sampler
from mergekit_evolve.samplers.swarm import swarm_space
from mergekit_evolve.study.pruning import make_pruner, staged_scores

LOG = logging.getLogger("search_quality")
TASKS = ("a", "b")
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {}),
    "tpe": ("tpe", {}),
    "cmaes": ("cmaes", {}),
    "cma": ("cma", {}),
    "cycleqd": ("cycleqd", {}),
    "cycleqd_paper": ("cycleqd", {"preset": "paper"}),
    "cycleqd_nomut": ("cycleqd", {"mutation": "none"}),
    "cycleqd_paper_nomut": ("cycleqd", {"preset": "paper", "mutation": "none"}),
    "swarm": ("swarm", {"particles": 8}),
    "swarm_paper": ("swarm", {"preset": "paper", "particles": 8}),
    "swarm_clip": ("swarm", {"particles": 8, "box": [0.0, 1.0]}),
}


@dataclass
class Problem:
    base: np.ndarray  # layers x d x d
    tau: np.ndarray  # experts x layers x d x d
    targets: dict[str, np.ndarray]  # task -> layers x d x d (target task vectors)
    inputs: dict[str, np.ndarray]  # split -> d x n

    @property
    def experts(self) -> int:
        return self.tau.shape[0]

    @property
    def layers(self) -> int:
        return self.tau.shape[1]

    def scores(self, delta: np.ndarray, split: str) -> dict[str, float]:
        x = self.inputs[split]
        out = {}
        for task, target in self.targets.items():
            err = sum(np.linalg.norm((delta[k] - target[k]) @ x) ** 2 for k in range(self.layers))
            norm = sum(np.linalg.norm(target[k] @ x) ** 2 for k in range(self.layers))
            out[f"{task}/acc,none"] = 1.0 / (1.0 + err / norm)
        return out


def make_problem(seed: int, experts: int, layers: int, d: int, inputs: int, heldout: int | None = None) -> Problem:
    """The problem is fixed by ``--problem-seed``; the search seeds vary only the samplers. ``heldout``:
    that split's inputs, when not as many as the search split's."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(layers, d, d))
    tau = rng.normal(size=(experts, layers, d, d)) / math.sqrt(d)
    targets = {}
    for t in TASKS:
        # per-layer coefficient profiles: each layer is owned by one expert (0.95), the others near 0
        # (0.05), the owner moving across the layers in a task's own order; the middle of the box
        # (0.5 everywhere) is far from it, and no single coefficient per expert fits every layer
        order = rng.permutation(experts)
        owner = order[np.arange(layers) * experts // layers]
        profile = np.full((experts, layers), 0.05)
        profile[owner, np.arange(layers)] = 0.95
        mix = np.einsum("kl,kl...->l...", profile, tau)
        u, s, vh = np.linalg.svd(mix)
        gain = rng.uniform(0.7, 1.3, size=s.shape)
        targets[t] = np.einsum("lij,lj,ljk->lik", u, s * gain, vh)
    xs = {split: rng.normal(size=(d, n)) for split, n in (("search", inputs), ("heldout", heldout or inputs))}
    return Problem(base, tau, targets, xs)


# -- spaces ------------------------------------------------------------------------------


def gradient_space(problem: Problem, points: int) -> SearchSpace:
    space = SearchSpace()
    for k in range(problem.experts):
        names = tuple(f"e{k}.g{i}" for i in range(points))
        for n in names:
            space.dimensions[n] = Dimension(n, "float", low=0.0, high=1.0)
        space.placements.append(Placement(("models", k, "parameters", "weight"), names, gradient=True))
    return space


def expert_space(problem: Problem, options: Any) -> SearchSpace:
    space = SearchSpace()
    for k in range(problem.experts):
        name = f"e{k}.weight"
        space.dimensions[name] = Dimension(name, "float", low=0.0, high=1.0)
        space.placements.append(Placement(("models", k, "parameters", "weight"), (name,)))
    if isinstance(options, CycleQDOptions):
        for name in mutation_dims(options):
            high = ((2**31 - 1) if name.endswith("seed")
                    else (options.w_max if options.mutation == "svd" else options.noise))
            space.dimensions[name] = Dimension(name, "int" if name.endswith("seed") else "float", low=0, high=high)
            space.placements.append(Placement(("parameters", name.split(".")[-1]), (name,)))
    if isinstance(options, SwarmOptions):
        space = swarm_space(space, options)
    return space


# -- candidates --------------------------------------------------------------------------


def gradient_delta(problem: Problem, params: dict[str, float], points: int) -> np.ndarray:
    grid = np.linspace(0, 1, points)
    at = np.linspace(0, 1, problem.layers)
    coef = np.array([np.interp(at, grid, [params[f"e{k}.g{i}"] for i in range(points)])
                     for k in range(problem.experts)])
    return np.einsum("kl,kl...->l...", coef, problem.tau)


def svd_mutate(delta: np.ndarray, seed: int, w_min: float, w_max: float) -> np.ndarray:
    out = np.empty_like(delta)
    for k in range(delta.shape[0]):
        u, s, vh = np.linalg.svd(delta[k])
        w = w_min + np.random.default_rng([seed, k]).uniform(size=s.shape) * (w_max - w_min)
        out[k] = (u * (s * w)) @ vh
    return out


def cycleqd_delta(problem: Problem, sampler: CycleQDSampler, coefficients: np.ndarray,
                  mix: tuple[tuple[int, float], ...], mutation: tuple[int, float] | None,
                  memo: dict[int, np.ndarray]) -> np.ndarray:
    """What ``svd_mutation`` with a ``lineage`` computes, in numpy: weighted experts, the mutated
    ancestors' task vectors, then this individual's own mutation."""
    delta = np.einsum("k,kl...->l...", coefficients, problem.tau)
    for t, c in mix:
        if t not in memo:
            e = sampler.individuals[t]
            memo[t] = cycleqd_delta(problem, sampler, np.array(e.coefficients), e.mix, e.mutation, memo)
        delta = delta + c * memo[t]
    if mutation is not None and mutation[1] > 0:
        delta = svd_mutate(delta, mutation[0], sampler.options.w_min, mutation[1])
    return delta


@dataclass
class Run:
    method: str
    seed: int
    search: list[float]  # search score a trial
    heldout: list[float]
    seconds: float


def run(problem: Problem, method: str, seed: int, trials: int, points: int) -> Run:
    sampler_name, options = METHODS[method]
    evolve = EvolveSettings(objectives=[{"task": t} for t in TASKS], sampler=sampler_name, seed=seed,
                            sampler_options=options, pruning={"pruner": "none"})
    space = gradient_space(problem, points) if sampler_name in ("random", "tpe", "cmaes", "cma") \
        else expert_space(problem, evolve.sampler_options)
    sampler = make_sampler(evolve, space)
    memo: dict[int, np.ndarray] = {}
    search: list[float] = []
    heldout: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        params = {n: (trial.suggest_int(n, int(d.low), int(d.high)) if d.kind == "int"
                      else trial.suggest_float(n, d.low, d.high))
                  for n, d in space.dimensions.items()}
        if sampler_name in ("random", "tpe", "cmaes", "cma"):
            delta = gradient_delta(problem, params, points)
        else:
            coefficients = np.array([params[f"e{k}.weight"] for k in range(problem.experts)])
            delta = np.einsum("k,kl...->l...", coefficients, problem.tau)
            if isinstance(sampler, CycleQDSampler):
                mix = sampler.inherits(trial)
                seed_dim = params.get("mutation.seed", 0)
                scale = params.get("mutation.w_max", 0.0)
                delta = cycleqd_delta(problem, sampler, coefficients, mix, (seed_dim, scale) if scale else None, memo)
        scores = problem.scores(delta, "search")
        trial.set_user_attr("scores", scores)
        search.append(float(np.mean(list(scores.values()))))
        heldout.append(float(np.mean(list(problem.scores(delta, "heldout").values()))))
        return study_values(evolve, scores)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return Run(method, seed, search, heldout, time.perf_counter() - t0)


def winner_heldout(r: Run) -> float:
    return r.heldout[int(np.argmax(r.search))]


def trials_to(r: Run, target: float) -> int | None:
    best = -math.inf
    for i, s in enumerate(r.search):
        best = max(best, s)
        if best >= target:
            return i + 1
    return None


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def table(runs: list[Run], methods: list[str], seeds: list[int], problem: Problem) -> str:
    best_by_seed = {s: max(max(r.search) for r in runs if r.seed == s) for s in seeds}
    experts = [float(np.mean(list(problem.scores(problem.tau[k], "heldout").values()))) for k in range(problem.experts)]
    lines = [
        "| method | held-out (mean ± 95% CI) | search (mean) | "
        "trials to 95% of the seed's best (median, reached) | s a run |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in methods:
        mine = [r for r in runs if r.method == m]
        mean, half = interval([winner_heldout(r) for r in mine])
        reach = [trials_to(r, 0.95 * best_by_seed[r.seed]) for r in mine]
        got = [x for x in reach if x is not None]
        med = f"{statistics.median(got):.0f}" if got else "-"
        lines.append(f"| {m} | {mean:.4f} ± {half:.4f} | {statistics.fmean(max(r.search) for r in mine):.4f} | "
                     f"{med}, {len(got)}/{len(mine)} | {statistics.fmean(r.seconds for r in mine):.1f} |")
    lines.append(f"| best expert alone | {max(experts):.4f} | | | |")
    return "\n".join(lines)


# -- the data flow space -----------------------------------------------------------------

ROUTE_METHODS = ("dfs", "dfs_w1", "ps", "ps_dfs")


@dataclass
class RoutingProblem:
    models: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # name -> its layers' (U, V)
    inputs: dict[str, np.ndarray]  # split -> n x d
    target: dict[str, np.ndarray]  # split -> the target path's outputs
    path: list[Hop]

    def forward(self, hops: list[Hop], x: np.ndarray) -> np.ndarray:
        """The package's convention: hop k's scale multiplies hop k-1's MLP output, hop 0's the embedding."""
        h = hops[0].scale * x
        for k, hop in enumerate(hops):
            u, v = self.models[hop.model][hop.layer]
            h = h + (hops[k + 1].scale if k + 1 < len(hops) else 1.0) * np.tanh(h @ u.T) @ v.T
        return h

    def score(self, hops: list[Hop], split: str) -> float:
        target = self.target[split]
        err = np.sum((self.forward(hops, self.inputs[split]) - target) ** 2) / np.sum(target**2)
        return float(1.0 / (1.0 + err))

    def own(self, model: str) -> list[Hop]:
        return [Hop(model, i) for i in range(len(self.models[model]))]

    def with_ps(self, params: dict[str, Any]) -> RoutingProblem:
        """This problem plus a model ``PS``: layer i mixes A and B ``ps.L{i}`` to 1 - it (the parameter space)."""
        layers = [(w * ua + (1 - w) * ub, w * va + (1 - w) * vb)
                  for i, ((ua, va), (ub, vb)) in enumerate(zip(self.models["A"], self.models["B"], strict=True))
                  for w in [params[f"ps.L{i}"]]]
        return dataclasses.replace(self, models={**self.models, "PS": layers})


def routing_block(models: list[str], layers: int, scales: bool) -> Routing:
    return Routing(models=models, num_layers=dict.fromkeys(models, layers), repeats=2,
                   scales=(0.5, 2.0) if scales else None, embed_filter=["embed"] if scales else [])


def make_routing_problem(seed: int, layers: int, d: int, inputs: int) -> RoutingProblem:
    rng = np.random.default_rng(seed)
    base = [(rng.normal(size=(d, d)) / math.sqrt(d), rng.normal(size=(d, d)) / math.sqrt(d)) for _ in range(layers)]
    models = {m: [(u + 0.5 * rng.normal(size=u.shape) / math.sqrt(d), v + 0.5 * rng.normal(size=v.shape) / math.sqrt(d))
                  for u, v in base] for m in ("A", "B")}
    block = routing_block(["A", "B"], layers, scales=True)
    # the target: `layers` hops through both models, slots DFS can open, a scale on every hop
    slots = sorted(rng.choice(block.slots, size=layers - 2, replace=False))
    path = [Hop("A", 0, float(rng.uniform(0.6, 1.6)))]
    path += [Hop(["A", "B"][m], layer, float(rng.uniform(0.6, 1.6))) for m, layer in map(block.slot_layer, slots)]
    path.append(Hop("A", layers - 1, float(rng.uniform(0.6, 1.6))))
    xs = {split: rng.normal(size=(inputs, d)) for split in ("search", "heldout")}
    problem = RoutingProblem(models, xs, {}, path)
    problem.target = {split: problem.forward(path, x) for split, x in xs.items()}
    return problem


def search_route(problem: RoutingProblem, block: Routing | None, seed: int, trials: int) -> tuple[Run, dict[str, Any]]:
    """pycma from the paper's start over ``block``'s dimensions (None: ``ps``, a mix per layer of A and B)."""
    space = SearchSpace()
    if block is not None:
        add_dimensions(space, block)
    else:
        for i in range(len(problem.models["A"])):
            space.dimensions[f"ps.L{i}"] = Dimension(f"ps.L{i}", "float", low=0.0, high=1.0, init=0.5)
    evolve = EvolveSettings(objectives=[{"task": "route"}], sampler="cma", seed=seed, sampler_options={"sigma0": 0.05},
                            pruning={"pruner": "none"})
    search: list[float] = []
    heldout: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, d.low, d.high) for n, d in space.dimensions.items()}
        if block is not None:
            candidate, path = problem, decode(block, params)
        else:
            candidate = problem.with_ps(params)
            path = candidate.own("PS")
        search.append(candidate.score(path, "search"))
        heldout.append(candidate.score(path, "heldout"))
        return search[-1]

    study = optuna.create_study(sampler=make_sampler(evolve, space), direction="maximize")
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return Run("", seed, search, heldout, time.perf_counter() - t0), study.best_params


def route_run(problem: RoutingProblem, method: str, seed: int, trials: int) -> Run:
    layers = len(problem.models["A"])
    if method in ("dfs", "dfs_w1"):
        r, _ = search_route(problem, routing_block(["A", "B"], layers, scales=method == "dfs"), seed, trials)
    else:
        r, best = search_route(problem, None, seed, trials)
        if method == "ps_dfs":
            second, _ = search_route(problem.with_ps(best), routing_block(["PS", "B"], layers, scales=True),
                                     seed, trials)
            # one run of 2 x trials: its winner is the better of the PS winner and the DFS stage's
            r = Run("", seed, r.search + second.search, r.heldout + second.heldout, r.seconds + second.seconds)
    r.method = method
    return r


def route_table(runs: list[Run], methods: list[str], problem: RoutingProblem) -> str:
    lines = ["| method | held-out (mean ± 95% CI) | search (mean) | trials | s a run |", "|---|---:|---:|---:|---:|"]
    for m in methods:
        mine = [r for r in runs if r.method == m]
        mean, half = interval([winner_heldout(r) for r in mine])
        lines.append(f"| {m} | {mean:.4f} ± {half:.4f} | {statistics.fmean(max(r.search) for r in mine):.4f} | "
                     f"{len(mine[0].search)} | {statistics.fmean(r.seconds for r in mine):.1f} |")
    for m in ("A", "B"):
        lines.append(f"| {m} alone | {problem.score(problem.own(m), 'heldout'):.4f} | | | |")
    return "\n".join(lines)


# -- cheap fitness -----------------------------------------------------------------------

HELDOUT = 4096  # held-out examples: the judge of the winners, not part of the budget, so large enough to rank them
DIFFICULTY = (0.3, 0.7)  # --metric acc: the range of the score an example needs
# (sampler, anchors per objective or None, pruning as the recipe writes it): `auto` resolves as for a user
FITNESS_MODES: dict[str, tuple[str, int | None, str]] = {
    "tpe full": ("tpe", None, "none"),
    "tpe successive_halving (auto)": ("tpe", None, "auto"),
    "tpe anchors": ("tpe", 16, "none"),
    "tpe anchors + percentile (auto)": ("tpe", 16, "auto"),
    "cmaes full (auto)": ("cmaes", None, "auto"),
    "cmaes anchors (auto)": ("cmaes", 16, "auto"),
}


@dataclass
class Items:
    """What makes the examples differ: the layers each one tests (a weight per layer; an example leans on
    a few layers, so on the experts that own them), and, for ``--metric acc``, the score it needs to be right."""

    layers: dict[str, np.ndarray]  # split -> examples x layers
    difficulty: dict[str, np.ndarray] | None  # split -> examples


def make_items(problem: Problem, seed: int, metric: str) -> Items:
    rng = np.random.default_rng([seed, 1])
    n = {split: x.shape[1] for split, x in problem.inputs.items()}
    layers = {split: rng.dirichlet(np.full(problem.layers, 0.3), size=k) for split, k in n.items()}
    difficulty = {split: rng.uniform(*DIFFICULTY, size=k) for split, k in n.items()} if metric == "acc" else None
    return Items(layers, difficulty)


class ExampleScores:
    """The weights problem example by example, served as the package's Evaluator serves staged scoring:
    the first ``fraction`` of a fixed shuffle of the split, or an objective's anchors; a candidate's
    examples are scored once and ``spent`` counts every example scored."""

    def __init__(self, problem: Problem, seed: int, items: Items) -> None:
        self.problem, self.items = problem, items
        n = problem.inputs["search"].shape[1]
        self.order = {t: [int(i) for i in np.random.default_rng([seed, k]).permutation(n)] for k, t in enumerate(TASKS)}
        self.done: dict[tuple[str, str], set[int]] = {}  # (candidate, task) -> examples scored
        self.spent = 0

    def per_example(self, delta: np.ndarray, split: str) -> dict[str, np.ndarray]:
        x, w = self.problem.inputs[split], self.items.layers[split]
        out = {}
        for task, target in self.problem.targets.items():
            err = sum(w[:, k] * np.sum(((delta[k] - target[k]) @ x) ** 2, axis=0) for k in range(self.problem.layers))
            norm = sum(w[:, k] * np.sum((target[k] @ x) ** 2, axis=0) for k in range(self.problem.layers))
            score = 1.0 / (1.0 + err / norm)
            difficulty = self.items.difficulty
            out[f"{task}/acc,none"] = score if difficulty is None else (score > difficulty[split]).astype(float)
        return out

    def score(self, model: tuple[str, np.ndarray], split: str = "search", digest: str | None = None,
              fraction: float = 1.0, anchors: dict[str, AnchorSet] | None = None) -> Scores:
        name, delta = model
        results = self.per_example(delta, split)
        values = {}
        for task in TASKS:
            key = f"{task}/acc,none"
            if split != "search":  # the held-out split is the report's, not the search's
                values[key] = float(results[key].mean())
                continue
            if anchors and key in anchors:
                ids, weights = anchors[key].ids, anchors[key].weights
            else:
                order = self.order[task]
                ids = order[: max(1, math.ceil(len(order) * fraction))]
                weights = [1 / len(ids)] * len(ids)
            done = self.done.setdefault((name, task), set())
            self.spent += len(set(ids) - done)
            done.update(ids)
            values[key] = float(sum(w * results[key][i] for i, w in zip(ids, weights, strict=True)))
        return Scores(values)


def fitness_run(problem: Problem, items: Items, mode: str, seed: int, budget: int, points: int) -> dict[str, Any]:
    """One search until ``budget`` examples are scored; the winner as the package picks it."""
    sampler_name, anchors_k, pruning = FITNESS_MODES[mode]
    evolve = EvolveSettings(objectives=[{"task": t, "anchors": anchors_k} for t in TASKS], sampler=sampler_name,
                            seed=seed, pruning={"pruner": pruning})
    space = gradient_space(problem, points)
    scorer = ExampleScores(problem, seed, items)
    anchors: dict[str, AnchorSet] = {}
    if anchors_k:  # the sources (base and experts) on the whole search split, then the clusters
        sources = [("base", np.zeros_like(problem.tau[0]))] + [(f"expert{k}", problem.tau[k])
                                                               for k in range(problem.experts)]
        for name, delta in sources:
            scorer.score((name, delta))
        results = [scorer.per_example(delta, "search") for _, delta in sources]
        n = problem.inputs["search"].shape[1]
        anchors = {key: choose_anchors(np.array([r[key] for r in results]), list(range(n)), anchors_k, seed)
                   for key in results[0]}
    deltas: dict[int, np.ndarray] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, d.low, d.high) for n, d in space.dimensions.items()}
        deltas[trial.number] = gradient_delta(problem, params, points)
        scores = staged_scores(evolve, scorer, anchors, (str(trial.number), deltas[trial.number]),
                               str(trial.number), trial)
        return Scores(scores.values).weighted(evolve.objectives)

    study = optuna.create_study(sampler=make_sampler(evolve, space), pruner=make_pruner(evolve.pruning),
                                direction="maximize")
    t0 = time.perf_counter()
    complete: list[optuna.trial.FrozenTrial] = []
    while scorer.spent < budget or not complete:  # a budget the anchors' setup spends still gets a winner
        study.optimize(objective, n_trials=1)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if evolve.estimated:  # values are anchor estimates: the best finalists re-scored on the whole split
        finalists = sorted(complete, key=lambda t: -t.value)[: evolve.finalists]
        full = {t.number: scorer.score((str(t.number), deltas[t.number])).weighted(evolve.objectives)
                for t in finalists}
        winner = max(finalists, key=lambda t: full[t.number]).number
        tied = sum(t.value == finalists[0].value for t in complete)  # what the package warns of past `finalists`
    else:
        winner, tied = study.best_trial.number, 0
    return {
        "candidates": len(study.trials), "pruned": len(study.trials) - len(complete), "spent": scorer.spent,
        "search": scorer.score((str(winner), deltas[winner])).weighted(evolve.objectives),
        "heldout": scorer.score(("", deltas[winner]), "heldout").weighted(evolve.objectives),
        "seconds": time.perf_counter() - t0, "tied": tied,
    }


def fitness_section(args: argparse.Namespace) -> str:
    problem = make_problem(args.problem_seed, args.experts, args.layers, args.dim, args.fitness_inputs, HELDOUT)
    budget = args.budget * len(TASKS) * args.fitness_inputs
    items = make_items(problem, args.problem_seed, args.metric)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in FITNESS_MODES}
    for seed in args.seeds:
        for mode in FITNESS_MODES:
            r = fitness_run(problem, items, mode, seed, budget, args.points)
            LOG.info("%-32s seed %d: %4d candidates (%d pruned, %d tied at the best estimate), held-out %.4f (%.1f s)",
                     mode, seed, r["candidates"], r["pruned"], r["tied"], r["heldout"], r["seconds"])
            rows[mode].append(r)
    lines = ["| sampler and mode | candidates (pruned) | examples a candidate | held-out (mean ± 95% CI) | "
             "vs the sampler's full (paired, mean ± 95% CI; seeds better) | s a run |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, mine in rows.items():
        mean, half = interval([r["heldout"] for r in mine])
        full = rows[next(m for m, (sampler, k, _) in FITNESS_MODES.items()
                         if sampler == FITNESS_MODES[mode][0] and k is None)]
        diffs = [r["heldout"] - f["heldout"] for r, f in zip(mine, full, strict=True)]
        d_mean, d_half = interval(diffs)
        vs = "" if mine is full else f"{d_mean:+.4f} ± {d_half:.4f}; {sum(d > 0 for d in diffs)}/{len(diffs)}"
        lines.append(f"| {mode} | {statistics.fmean(r['candidates'] for r in mine):.0f} "
                     f"({statistics.fmean(r['pruned'] for r in mine):.0f}) | "
                     f"{statistics.fmean(r['spent'] / r['candidates'] for r in mine):.0f} | {mean:.4f} ± {half:.4f} | "
                     f"{vs} | {statistics.fmean(r['seconds'] for r in mine):.1f} |")
    head = (f"metric {args.metric}, a budget of {args.budget} whole-split evaluations a run ({budget} examples scored: "
            f"{len(TASKS)} tasks x {args.fitness_inputs} examples; {HELDOUT} held-out), seeds {args.seeds}, "
            f"{args.experts} experts x {args.layers} layers ({args.experts * args.points} gradient dimensions), "
            f"problem seed {args.problem_seed}")
    return f"{head}\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--points", type=int, default=6, help="gradient control points per expert (box samplers)")
    parser.add_argument("--dim", type=int, default=16, help="matrix size of a layer")
    parser.add_argument("--inputs", type=int, default=8, help="input vectors a split")
    parser.add_argument("--problem-seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--section", choices=["weights", "routing", "fitness"], default="weights",
                        help="weights: the samplers and methods in weight space; routing: the DFS ablations; "
                             "fitness: the cheap-fitness modes on the weights problem")
    parser.add_argument("--budget", type=int, default=100, help="fitness: whole-split evaluations a run")
    parser.add_argument("--fitness-inputs", type=int, default=128, help="fitness: examples a split")
    parser.add_argument("--metric", choices=["score", "acc"], default="acc",
                        help="fitness: an example's 1 / (1 + err), or 1 when that clears the example's difficulty")
    parser.add_argument("--route-layers", type=int, default=6, help="routing: layers of each model, hops of the target")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.section == "routing":
        text = routing_section(args)
    elif args.section == "fitness":
        text = fitness_section(args)
    else:
        problem = make_problem(args.problem_seed, args.experts, args.layers, args.dim, args.inputs)
        runs = []
        for seed in args.seeds:
            for method in args.methods:
                r = run(problem, method, seed, args.trials, args.points)
                LOG.info("%-14s seed %d: search %.4f held-out %.4f (%.1f s)", method, seed, max(r.search),
                         winner_heldout(r), r.seconds)
                runs.append(r)
        head = (f"{args.trials} trials a run, seeds {args.seeds}, {args.experts} experts x {args.layers} layers "
                f"({args.experts * args.points} gradient dimensions for the box samplers), "
                f"problem seed {args.problem_seed}")
        text = f"{head}\n\n{table(runs, args.methods, args.seeds, problem)}\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)


def routing_section(args: argparse.Namespace) -> str:
    problem = make_routing_problem(args.problem_seed, args.route_layers, args.dim, args.inputs)
    runs = []
    for seed in args.seeds:
        for method in ROUTE_METHODS:
            r = route_run(problem, method, seed, args.trials)
            LOG.info("%-8s seed %d: search %.4f held-out %.4f (%.1f s)", method, seed, max(r.search),
                     winner_heldout(r), r.seconds)
            runs.append(r)
    hops = " -> ".join(f"{h.model}{h.layer}" for h in problem.path)
    head = (f"{args.trials} trials a run (ps_dfs: twice), seeds {args.seeds}, "
            f"two models of {args.route_layers} layers, the target path {hops}, problem seed {args.problem_seed}")
    return f"{head}\n\n{route_table(runs, list(ROUTE_METHODS), problem)}\n"


if __name__ == "__main__":
    main()
