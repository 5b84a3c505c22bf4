"""The recipe's ``evolve.sampler`` -> an Optuna sampler: one registry entry per sampler.

Each entry says whether the sampler can search several objectives, checks that it fits the
recipe's search space (``check_sampler``, before anything loads) and builds it (``make_sampler``,
once per study and process). Every sampler is an ``optuna.samplers.BaseSampler``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from mergekit_evolve.methods.lora_particle import AdapterError
from mergekit_evolve.recipe.annotations import is_annotation
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.sampler_options import (
    CycleQDOptions,
    OptunaOptions,
    PyCmaOptions,
    SwarmOptions,
)
from mergekit_evolve.recipe.search_space import SearchSpace
from mergekit_evolve.samplers.cmaes import CmaEsSampler
from mergekit_evolve.samplers.coordinates import CoordinateError, ExpertWeights
from mergekit_evolve.samplers.cycleqd import (
    SEED_DIM,
    CycleQDSampler,
    mutation_dims,
    with_mutation,
)
from mergekit_evolve.samplers.pycma import PyCmaSampler
from mergekit_evolve.samplers.swarm import LORA_METHOD, SwarmSampler, with_box, with_lora_particles

LOG = logging.getLogger(__name__)
# Methods whose per-model ``weight`` is a coefficient on a task vector (or on the model, for linear).
COEFFICIENT_METHODS = {"swarm": ("task_arithmetic", "linear"), "cycleqd": ("task_arithmetic",)}


class SamplerSetupError(ValueError):
    pass


@dataclass(frozen=True)
class SamplerEntry:
    build: Callable[[EvolveSettings, SearchSpace], optuna.samplers.BaseSampler]
    check: Callable[[EvolveSettings, SearchSpace], Any] = lambda settings, space: None  # raises when it does not fit
    multi_objective: bool = False  # searches a Pareto front (one study direction per objective)


def _optuna(
    cls: Callable[..., optuna.samplers.BaseSampler],
) -> Callable[[EvolveSettings, SearchSpace], optuna.samplers.BaseSampler]:
    def build(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
        options = settings.sampler_options
        assert isinstance(options, OptunaOptions)
        try:
            return cls(seed=settings.seed, **options.kwargs())
        except TypeError as e:
            raise SamplerSetupError(f"evolve.sampler_options do not fit sampler '{settings.sampler}': {e}") from None

    return build


def _no_categorical(settings: EvolveSettings, space: SearchSpace) -> None:
    categorical = space.categorical()
    if categorical:
        raise SamplerSetupError(
            f"CMA-ES cannot search categorical dimensions {categorical}; use sampler: tpe "
            "(or random), or turn the choice into a fixed value"
        )


def _warn_pruned_cmaes(settings: EvolveSettings) -> None:
    """A recipe that asks to prune CMA-ES (``auto`` does not) is told once what that costs."""
    options = settings.sampler_options
    if settings.sampler == "cmaes" and settings.pruning.pruner != "none" and isinstance(options, OptunaOptions) \
            and not options.kwargs().get("consider_pruned_trials"):
        LOG.warning(
            "cmaes with pruner '%s': Optuna's CMA-ES learns only from completed trials, so every pruned trial is "
            "spent without moving the search, and a generation fills only with completed members; set "
            "pruning.pruner: none to run CMA-ES as the paper did", settings.pruning.pruner,
        )


def _check_pycma(settings: EvolveSettings, space: SearchSpace) -> None:
    _no_categorical(settings, space)
    if len(space) < 2:
        raise SamplerSetupError(
            f"pycma needs at least two search dimensions; the recipe has {len(space)} ({', '.join(space.dimensions)}); "
            "use sampler: tpe, gp or random for a one-dimensional search"
        )


def _pycma(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    assert isinstance(settings.sampler_options, PyCmaOptions)
    return PyCmaSampler(space.distributions(), settings.objectives, settings.seed, settings.sampler_options,
                        space.init_point())


def _experts(space: SearchSpace, sampler: str, extra: tuple[str, ...] = ()) -> ExpertWeights:
    experts = ExpertWeights(space, sampler, extra)
    if len(experts) < 2:
        found = ", ".join(e.label for e in experts.experts) or "none"
        raise SamplerSetupError(
            f"{sampler} combines at least two experts (models whose weight is searched, e.g. "
            f"weight: {{search: [0, 1]}}); the recipe has {len(experts)} ({found}): annotate the weight of each expert"
        )
    return experts


def _cycleqd_experts(settings: EvolveSettings, space: SearchSpace) -> ExpertWeights:
    if len(settings.objectives) < 2:
        raise SamplerSetupError(
            f"CycleQD keeps one archive per task and bins each by the other tasks' scores, so it needs at least two "
            f"objectives; evolve.objectives has {len(settings.objectives)} ({settings.objectives[0].name}): "
            "add another task, or use sampler: cma / cmaes / tpe"
        )
    assert isinstance(settings.sampler_options, CycleQDOptions)
    extra = mutation_dims(settings.sampler_options)
    missing = [d for d in extra if d not in space.dimensions]
    if missing:
        raise SamplerSetupError(f"the search space lacks CycleQD's mutation dimensions {missing}; "
                                "load the recipe through prepare_recipe()")
    return _experts(space, "cycleqd", extra)


def _cycleqd(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    experts = _cycleqd_experts(settings, space)
    options = settings.sampler_options
    assert isinstance(options, CycleQDOptions)
    extra = mutation_dims(options)
    distributions = {**experts.distributions, **{d: space.dimensions[d].distribution() for d in extra}}
    return CycleQDSampler(distributions, settings.objectives, settings.seed, options, experts)


def _swarm(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    experts = _experts(space, "swarm")
    assert isinstance(settings.sampler_options, SwarmOptions)
    return SwarmSampler(experts.distributions, settings.objectives, settings.seed, settings.sampler_options, experts)


REGISTRY: dict[str, SamplerEntry] = {
    # Sakana's setting: CMA-ES from the middle of the box unless the recipe gives inits
    "cmaes": SamplerEntry(_optuna(CmaEsSampler), _no_categorical),
    "cma": SamplerEntry(_pycma, _check_pycma),
    "tpe": SamplerEntry(_optuna(optuna.samplers.TPESampler), multi_objective=True),
    "gp": SamplerEntry(_optuna(optuna.samplers.GPSampler), multi_objective=True),
    "random": SamplerEntry(_optuna(optuna.samplers.RandomSampler), multi_objective=True),
    "nsga2": SamplerEntry(_optuna(optuna.samplers.NSGAIISampler), multi_objective=True),
    # CycleQD reads the per-objective scores anyway
    "cycleqd": SamplerEntry(_cycleqd, _cycleqd_experts, multi_objective=True),
    "swarm": SamplerEntry(_swarm, lambda settings, space: _experts(space, "swarm")),
}


def check_sampler(settings: EvolveSettings, space: SearchSpace) -> None:
    """SamplerSetupError unless the recipe's sampler can search this space as configured."""
    entry = REGISTRY[settings.sampler]
    if settings.multi_objective and not entry.multi_objective:
        multi = ", ".join(name for name, e in REGISTRY.items() if e.multi_objective)
        raise SamplerSetupError(
            f"sampler '{settings.sampler}' optimises one value, but evolve.multi_objective is true; use one of "
            f"{multi} for a Pareto front, or drop multi_objective to search the weighted objective"
        )
    try:
        entry.check(settings, space)
    except CoordinateError as e:
        raise SamplerSetupError(str(e)) from None


def make_sampler(settings: EvolveSettings, space: SearchSpace, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler a study (or one worker of it: ``seed_offset``) searches with, seeded."""
    check_sampler(settings, space)
    if seed_offset:
        settings = settings.model_copy(update={"seed": settings.seed + seed_offset})
    try:
        return REGISTRY[settings.sampler].build(settings, space)
    except CoordinateError as e:
        raise SamplerSetupError(str(e)) from None


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
        if (SEED_DIM not in recipe.search_space.dimensions
                and not (sampler == "swarm" and recipe.template.get("merge_method") == LORA_METHOD)):
            _check_coefficient_method(recipe, sampler)
        if sampler == "cycleqd":
            assert isinstance(recipe.evolve.sampler_options, CycleQDOptions)
            recipe = with_mutation(recipe, recipe.evolve.sampler_options)
        if sampler == "swarm":
            assert isinstance(recipe.evolve.sampler_options, SwarmOptions)
            check_sampler(recipe.evolve, recipe.search_space)  # the experts' own ranges, named as the recipe wrote them
            if recipe.evolve.sampler_options.particle_kind == "lora":
                try:
                    recipe = with_lora_particles(recipe)
                except (CoordinateError, AdapterError) as e:
                    raise SamplerSetupError(str(e)) from None
            recipe = with_box(recipe, recipe.evolve.sampler_options)
    check_sampler(recipe.evolve, recipe.search_space)
    _warn_pruned_cmaes(recipe.evolve)
    return recipe
