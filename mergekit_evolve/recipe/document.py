"""A recipe file, read and parsed once: one search, or ``stages:`` of searches.

A genome file of mergekit's deprecated mergekit-evolve stands for the recipe it translates
to; errors still name the genome's lines, and run folders keep the translation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from mergekit_evolve.recipe.genome import is_genome, recipe_text, translate_genome_file
from mergekit_evolve.recipe.overrides import Overrides
from mergekit_evolve.recipe.parse import Recipe, parse_recipe
from mergekit_evolve.recipe.stages import Stage, is_staged, parse_stages
from mergekit_evolve.recipe.yaml_lines import LocatedYaml, RecipeError, load_located


@dataclass(frozen=True)
class RecipeDocument:
    path: Path  # resolved
    doc: LocatedYaml  # a genome file's translation, lines kept
    text: str  # what a run folder keeps as its recipe.yml
    genome: bool = False  # the file is a genome of mergekit's deprecated mergekit-evolve
    overrides: Overrides = Overrides()

    @property
    def staged(self) -> bool:
        return is_staged(self.doc)

    @property
    def name(self) -> str:
        return self.path.stem

    def with_overrides(self, overrides: Overrides) -> RecipeDocument:
        """The same document with command-line settings applied to every search it holds."""
        if self.staged and overrides.recipe_only():
            raise RecipeError(f"{', '.join(overrides.recipe_only())} apply to single recipes, not stages",
                              str(self.path))
        return replace(self, overrides=overrides)

    def recipe(self) -> Recipe:
        """The one search of an ordinary recipe."""
        if self.staged:
            raise RecipeError("this is a staged recipe; run its stages", str(self.path))
        return self.overrides.apply(parse_recipe(self.doc, self.path, self.text))

    def stages(self, run_dir: Path, until: str | None = None) -> list[Stage]:
        """The stages of a staged recipe (up to ``until``), validated against what ``run_dir`` holds now."""
        stages = parse_stages(self.doc, self.path, self.text, run_dir, until)
        return [replace(s, recipe=self.overrides.apply(s.recipe)) for s in stages]


def load_document(path: str | os.PathLike[str]) -> RecipeDocument:
    """Read a recipe (or genome) file once."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror}", str(p)) from None
    doc = load_located(text, str(p))
    if not is_genome(doc.data):
        return RecipeDocument(p.resolve(), doc, text)
    translation = translate_genome_file(doc, p.resolve().parent)
    return RecipeDocument(p.resolve(), translation.doc(doc.source), recipe_text(translation, p), genome=True)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """The one search of the recipe (or genome) file at ``path``."""
    return load_document(path).recipe()
