"""A point of the search space -> the concrete mergekit config it stands for."""

from __future__ import annotations

import hashlib
from typing import Any

from mergekit.config import MergeConfiguration

from mergekit_evolve.recipe.load import Recipe, fill, validate_config


def compile_point(recipe: Recipe, point: dict[str, Any]) -> MergeConfiguration:
    """Substitute ``point`` into the recipe and let mergekit validate the result."""
    missing = set(recipe.space.dimensions) - set(point)
    if missing:
        raise ValueError(f"the point lacks values for {sorted(missing)}")
    return validate_config(recipe.doc, fill(recipe.template, recipe.space, point))


def config_digest(config: MergeConfiguration) -> str:
    """Identical configs (and so identical merged models) share a digest."""
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:16]
