"""Ask an Optuna trial for a value of every dimension of the space."""

from __future__ import annotations

from typing import Any

import optuna

from mergekit_evolve.recipe.search_space import Dimension, SearchSpace


def suggest(trial: optuna.Trial, dim: Dimension) -> Any:
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.name, list(dim.choices))
    if dim.kind == "int":
        return trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log, step=dim.step)


def suggest_point(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    return {name: suggest(trial, dim) for name, dim in space.dimensions.items()}
