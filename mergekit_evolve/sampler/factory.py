"""The recipe's ``evolve.sampler`` -> an Optuna sampler, seeded."""

from __future__ import annotations

import logging

import optuna

from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.space.search_space import SearchSpace

LOG = logging.getLogger(__name__)


class SamplerSetupError(ValueError):
    pass


def make_sampler(settings: EvolveSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = dict(settings.sampler_options)
    seed = settings.seed
    try:
        if settings.sampler == "cmaes":
            categorical = space.categorical()
            if categorical:
                raise SamplerSetupError(
                    f"CMA-ES cannot search categorical dimensions {categorical}; use sampler: tpe "
                    "(or random), or turn the choice into a fixed value"
                )
            # Sakana's setting: start from the middle of the box unless the recipe gives inits.
            return optuna.samplers.CmaEsSampler(seed=seed, **opts)
        if settings.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **opts)
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    except TypeError as e:
        raise SamplerSetupError(f"evolve.sampler_options do not fit sampler '{settings.sampler}': {e}") from None
