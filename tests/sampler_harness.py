"""Synthetic studies for the sampler tests: the real samplers on cheap, known objectives (no models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from mergekit_evolve.evaluate.scores import directions, study_values
from mergekit_evolve.recipe.evolve_settings import EvolveSettings

Scorer = Callable[[dict[str, Any]], dict[str, float]]


def settings(*tasks: str, **kwargs: Any) -> EvolveSettings:
    return EvolveSettings(objectives=[{"task": t} for t in tasks], **kwargs)


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def make_objective(distributions: dict[str, BaseDistribution], scorer: Scorer, evolve: EvolveSettings):
    """An Optuna objective that suggests every dimension and stores per-objective scores as the worker does."""

    def objective(trial: optuna.Trial):
        params = {name: _suggest(trial, name, dist) for name, dist in distributions.items()}
        scores = scorer(params)
        trial.set_user_attr("scores", scores)
        return study_values(evolve, scores)

    return objective


def new_study(sampler: optuna.samplers.BaseSampler, evolve: EvolveSettings, storage: Any = None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=sampler, directions=directions(evolve), storage=storage)


def run_study(sampler, distributions, scorer: Scorer, evolve: EvolveSettings, trials: int, study=None) -> optuna.Study:
    study = study or new_study(sampler, evolve)
    study.optimize(make_objective(distributions, scorer, evolve), n_trials=trials)
    return study


def expert_space(n: int, low: float = 0.0, high: float = 1.0, extra: tuple = ()):
    """A space like a task_arithmetic recipe's: ``models[i].parameters.weight`` searched for n experts."""
    from mergekit_evolve.recipe.search_space import Dimension, Placement, SearchSpace

    space = SearchSpace()
    for i in range(1, n + 1):
        name = f"v{i}.weight"
        space.dimensions[name] = Dimension(name, "float", low=low, high=high)
        space.placements.append(Placement(("models", i, "parameters", "weight"), (name,)))
    for dim in extra:
        space.dimensions[dim.name] = dim
        space.placements.append(Placement(("parameters", dim.name.split(".")[-1]), (dim.name,)))
    return space


def write_recipe(folder, models, *, sampler: str, name: str = "r", options: str = "{}", trials: int = 6,
                 multi: bool = False, method: str = "task_arithmetic", params: str = "", low: float = 0.0,
                 extra: str = "", two_objectives: bool = True):
    """A recipe over tiny models: ``models[0]`` is the base, the others are experts with searched weights."""
    import textwrap

    base, *experts = models
    entries = "".join(
        f"\n  - model: {e}\n    parameters: {{weight: {{search: [{low}, 1.0]}}}}" for e in experts
    )
    second = ('\n    - {task: tiny_copy, metric: "perplexity,none", goal: minimize, heldout_task: tiny_copy_heldout}'
              if two_objectives else "")
    text = textwrap.dedent(f"""\
        merge_method: {method}
        base_model: {base}
        models:
          - model: {base}""") + entries + f"""
{params}dtype: float32
evolve:
  allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
  sampler: {sampler}
  sampler_options: {options}
  multi_objective: {str(multi).lower()}
  trials: {trials}
  seed: 3
  objectives:
    - {{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}{second}
  task_paths: [tasks]
{extra}"""
    path = folder / f"{name}.yml"
    path.write_text(text)
    return path
