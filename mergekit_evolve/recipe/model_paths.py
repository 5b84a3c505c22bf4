"""Model references in a recipe: local folders resolved against the recipe's folder, ``prepared:``
models against the prepared-model cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_evolve.prepared import PrepareError
from mergekit_evolve.prepared import resolve as resolve_prepared
from mergekit_evolve.recipe.annotations import set_at, walk
from mergekit_evolve.recipe.yaml_lines import LocatedYaml

# Keys whose string values name models; local folders are resolved against the recipe's folder.
MODEL_KEYS = {"model", "base_model", "tokenizer_source", "source"}


def _local(path: str, base_dir: Path) -> str:
    """A ``prepared:`` model's cached folder (prepared now if missing), a local folder made
    absolute, or the value unchanged (a Hub id)."""
    prepared = resolve_prepared(path)
    if prepared is not None:
        return prepared
    candidate = base_dir / path
    return str(candidate.resolve()) if candidate.exists() else path


def resolve_model_path(value: str, base_dir: Path) -> str:
    """A model reference with its local parts resolved; ``base+adapter`` resolves both parts."""
    path, _, lora = value.partition("+")
    return _local(path, base_dir) + (f"+{_local(lora, base_dir)}" if lora else "")


def resolve_model_paths(template: Any, base_dir: Path, doc: LocatedYaml | None = None) -> None:
    """Make local model folders absolute so trials merge the same models from any working directory."""
    for loc, value in list(walk(template)):
        if loc and loc[-1] in MODEL_KEYS and isinstance(value, str):
            try:
                set_at(template, loc, resolve_model_path(value, base_dir))
            except PrepareError as e:
                if doc is None:
                    raise
                raise doc.error(loc, str(e)) from None
