"""Command-line settings that override a recipe's ``evolve:`` section for one run: the one place they apply."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.yaml_lines import RecipeError

if TYPE_CHECKING:  # parse imports nothing from here; the annotation only
    from mergekit_evolve.recipe.parse import Recipe

# mergekit's deprecated mergekit-evolve's options, which change what is searched (a recipe's own business)
RECIPE_ONLY = {"sigma0": "--sigma0", "task_paths": "--task-search-path", "seed": "--random-seed",
               "batch_size": "--batch-size"}


class Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trials: int | None = Field(default=None, ge=1)
    device: str | None = None
    storage: str | None = None
    workers: int | None = Field(default=None, ge=1)
    seed: int | None = None
    batch_size: int | None = Field(default=None, ge=1)
    sigma0: float | None = Field(default=None, gt=0)
    # given on the command line, so relative to the working directory, not to the recipe
    task_paths: tuple[str, ...] = ()

    def recipe_only(self) -> list[str]:
        """The flags set here that only an ordinary (one-search) recipe accepts."""
        return [flag for field, flag in RECIPE_ONLY.items() if field in self.model_fields_set and getattr(self, field)]

    def apply(self, recipe: Recipe) -> Recipe:
        if recipe.evolve is None or not self.model_fields_set:
            return recipe
        settings: dict[str, Any] = recipe.evolve.model_dump(exclude_unset=True)
        for key in ("trials", "device", "storage", "workers", "seed", "batch_size"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        if self.task_paths:
            settings["task_paths"] = [*recipe.evolve.task_paths, *(str(Path(p).resolve()) for p in self.task_paths)]
        if self.sigma0 is not None:
            if recipe.evolve.sampler not in ("cma", "cmaes"):
                raise RecipeError(f"--sigma0 is CMA-ES's initial step size, but the recipe's sampler is "
                                  f"'{recipe.evolve.sampler}'", str(recipe.path))
            settings["sampler_options"] = {**recipe.evolve.sampler_options.given(), "sigma0": self.sigma0}
        return replace(recipe, evolve=EvolveSettings.model_validate(settings))
