"""The cmaes sampler: Optuna's CmaEsSampler points, reading the storage once a trial fewer."""

import optuna
from optuna.storages import InMemoryStorage

from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.search_space import Dimension, SearchSpace
from mergekit_evolve.samplers.cmaes import CmaEsSampler
from mergekit_evolve.samplers.registry import make_sampler

TRIALS = 15  # popsize 4: three generations told, and a partial one


class CountingStorage(InMemoryStorage):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def get_all_trials(self, *args, **kwargs):
        self.reads += 1
        return super().get_all_trials(*args, **kwargs)


def objective(trial: optuna.Trial) -> float:
    # a one-value and a categorical dimension too: CMA-ES leaves those to its independent sampler
    x = trial.suggest_float("x", 0.0, 1.0)
    y = trial.suggest_float("y", -1.0, 1.0)
    n = trial.suggest_int("n", 0, 4)
    fixed = trial.suggest_float("fixed", 2.0, 2.0)
    k = trial.suggest_categorical("k", ["a", "b"])
    return (x - 0.3) ** 2 + (y - 0.5) ** 2 + n + fixed + (k == "b")


def search(sampler: optuna.samplers.BaseSampler) -> tuple[list[dict], int]:
    storage = CountingStorage()
    study = optuna.create_study(sampler=sampler, storage=storage)
    study.optimize(objective, n_trials=TRIALS)
    return [t.params for t in study.trials], storage.reads


def test_same_points_as_optunas_cma_es_with_one_read_fewer_a_trial():
    options = dict(seed=0, popsize=4, warn_independent_sampling=False)
    ours, our_reads = search(CmaEsSampler(**options))
    theirs, their_reads = search(optuna.samplers.CmaEsSampler(**options))
    assert ours == theirs
    assert their_reads - our_reads == TRIALS - 1  # the first trial has no search space yet to sample from


def test_recipes_get_this_sampler_for_cmaes():
    settings = EvolveSettings(objectives=[{"task": "t"}], sampler="cmaes", sampler_options={"popsize": 6})
    space = SearchSpace({"w": Dimension("w", "float", 0.0, 1.0), "v": Dimension("v", "float", 0.0, 1.0)})
    assert isinstance(make_sampler(settings, space), CmaEsSampler)
