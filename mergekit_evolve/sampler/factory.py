"""The recipe's ``evolve.sampler`` -> an Optuna sampler, seeded; and the checks that it fits the recipe."""

from __future__ import annotations

import logging
from typing import Any

import optuna

from mergekit_evolve.recipe.annotations import is_annotation
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.sampler.cmaes import CmaEsSampler
from mergekit_evolve.sampler.coordinates import CoordinateError, ExpertWeights
from mergekit_evolve.sampler.options import CycleQDOptions, PyCmaOptions, SwarmOptions
from mergekit_evolve.space.search_space import SearchSpace

LOG = logging.getLogger(__name__)
# Optuna's multi-objective samplers, and CycleQD (which reads the per-objective scores anyway).
MULTI_OBJECTIVE = ("tpe", "gp", "random", "nsga2", "cycleqd")
# Methods whose per-model ``weight`` is a coefficient on a task vector (or on the model, for linear).
COEFFICIENT_METHODS = {"swarm": ("task_arithmetic", "linear"), "cycleqd": ("task_arithmetic",)}


class SamplerSetupError(ValueError):
    pass


def make_sampler(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = dict(settings.sampler_options)
    seed = settings.seed
    name = settings.sampler
    if settings.multi_objective and name not in MULTI_OBJECTIVE:
        raise SamplerSetupError(
            f"sampler '{name}' optimises one value, but evolve.multi_objective is true; use one of "
            f"{', '.join(MULTI_OBJECTIVE)} for a Pareto front, or drop multi_objective to search the weighted objective"
        )
    if name in ("cmaes", "cma"):
        categorical = space.categorical()
        if categorical:
            raise SamplerSetupError(
                f"CMA-ES cannot search categorical dimensions {categorical}; use sampler: tpe "
                "(or random), or turn the choice into a fixed value"
            )
    try:
        if name == "cmaes":
            # Sakana's setting: start from the middle of the box unless the recipe gives inits.
            return CmaEsSampler(seed=seed, **opts)
        if name == "cma":
            return _pycma(settings, space)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, **opts)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if name == "cycleqd":
            return _cycleqd(settings, space)
        if name == "swarm":
            return _swarm(settings, space)
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    except TypeError as e:
        raise SamplerSetupError(f"evolve.sampler_options do not fit sampler '{name}': {e}") from None
    except CoordinateError as e:
        raise SamplerSetupError(str(e)) from None


def _pycma(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    from mergekit_evolve.sampler.pycma_sampler import PyCmaSampler

    if len(space) < 2:
        raise SamplerSetupError(
            f"pycma needs at least two search dimensions; the recipe has {len(space)} ({', '.join(space.dimensions)}); "
            "use sampler: tpe, gp or random for a one-dimensional search"
        )
    return PyCmaSampler(
        space.distributions(), settings.objectives, settings.seed,
        PyCmaOptions.model_validate(settings.sampler_options), space.init_point(),
    )


def _experts(space: SearchSpace, sampler: str, extra: tuple[str, ...] = ()) -> ExpertWeights:
    experts = ExpertWeights(space, sampler, extra)
    if len(experts) < 2:
        found = ", ".join(e.label for e in experts.experts) or "none"
        raise SamplerSetupError(
            f"{sampler} combines at least two experts (models whose weight is searched, e.g. "
            f"weight: {{search: [0, 1]}}); the recipe has {len(experts)} ({found}): annotate the weight of each expert"
        )
    return experts


def _cycleqd(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    from mergekit_evolve.sampler.cycleqd import CycleQDSampler, mutation_dims

    if len(settings.objectives) < 2:
        raise SamplerSetupError(
            f"CycleQD keeps one archive per task and bins each by the other tasks' scores, so it needs at least two "
            f"objectives; evolve.objectives has {len(settings.objectives)} ({settings.objectives[0].name}): add another "
            "task, or use sampler: cma / cmaes / tpe"
        )
    options = CycleQDOptions.model_validate(settings.sampler_options)
    extra = mutation_dims(options)
    missing = [d for d in extra if d not in space.dimensions]
    if missing:
        raise SamplerSetupError(f"the search space lacks CycleQD's mutation dimensions {missing}; load the recipe through prepare_recipe()")
    experts = _experts(space, "cycleqd", extra)
    distributions = {**experts.distributions, **{d: space.dimensions[d].distribution() for d in extra}}
    return CycleQDSampler(distributions, settings.objectives, settings.seed, options, experts)


def _swarm(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    from mergekit_evolve.sampler.swarm import SwarmSampler

    experts = _experts(space, "swarm")
    options = SwarmOptions.model_validate(settings.sampler_options)
    return SwarmSampler(experts.distributions, settings.objectives, settings.seed, options, experts)


def _check_coefficient_method(recipe: Recipe, sampler: str) -> None:
    """Swarm particles and CycleQD individuals are coefficient vectors: the merge must be linear in them."""
    method: Any = recipe.template.get("merge_method")
    allowed = COEFFICIENT_METHODS[sampler]
    if is_annotation(method) or method not in allowed:
        raise SamplerSetupError(
            f"{sampler} moves coefficients over the experts' task vectors, so the recipe's merge_method must be "
            f"{' or '.join(allowed)}, not {method!r}"
        )
    params = recipe.template.get("parameters") or {}
    if params.get("normalize", False if method == "task_arithmetic" else True) is not False:
        raise SamplerSetupError(
            f"{sampler} needs un-normalised coefficients (Sakana and Model Swarms keep weights as they are): "
            "set parameters: {normalize: false} in the recipe"
        )
    others = sorted(k for k, v in params.items() if not (k == "normalize" or (k == "lambda" and v == 1)))
    if sampler == "cycleqd" and others:
        raise SamplerSetupError(
            f"cycleqd replaces task_arithmetic by its mutation method, which takes only per-model weights; "
            f"remove the top-level parameters {others} from the recipe"
        )


def prepare_recipe(recipe: Recipe) -> Recipe:
    """The recipe as its sampler searches it (CycleQD adds its mutation); SamplerSetupError when they do not fit."""
    assert recipe.evolve is not None
    sampler = recipe.evolve.sampler
    if sampler in COEFFICIENT_METHODS:
        from mergekit_evolve.sampler.cycleqd import SEED_DIM, with_mutation

        if SEED_DIM not in recipe.space.dimensions:
            _check_coefficient_method(recipe, sampler)
        if sampler == "cycleqd":
            recipe = with_mutation(recipe, CycleQDOptions.model_validate(recipe.evolve.sampler_options))
    make_sampler(recipe.evolve, recipe.space)
    return recipe
