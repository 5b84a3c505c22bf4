"""Model references in a recipe: local folders resolved against the recipe's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_evolve.recipe.annotations import set_at, walk

# Keys whose string values name models; local folders are resolved against the recipe's folder.
MODEL_KEYS = {"model", "base_model", "tokenizer_source", "source"}


def resolve_model_path(value: str, base_dir: Path) -> str:
    """A local model folder made absolute (a ``+lora`` suffix kept); anything else unchanged."""
    path, _, lora = value.partition("+")
    candidate = base_dir / path
    return str(candidate.resolve()) + (f"+{lora}" if lora else "") if candidate.exists() else value


def resolve_model_paths(template: Any, base_dir: Path) -> None:
    """Make local model folders absolute so trials merge the same models from any working directory."""
    for loc, value in list(walk(template)):
        if loc and loc[-1] in MODEL_KEYS and isinstance(value, str):
            set_at(template, loc, resolve_model_path(value, base_dir))
