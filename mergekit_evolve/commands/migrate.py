"""Coming from mergekit's deprecated ``mergekit-evolve``: ``migrate`` a genome file, and its CLI options.

``mergekit-evolve migrate GENOME.yml -o recipe.yml`` writes the recipe a genome file stands for
(``mergekit-evolve GENOME.yml`` runs that translation directly). ``run`` also accepts the old
command's common options, each mapped to its counterpart here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergekit_evolve.recipe.yaml_lines import RecipeError

if TYPE_CHECKING:
    from mergekit_evolve.recipe.load import Recipe

LOG = logging.getLogger("mergekit_evolve")


@dataclasses.dataclass(frozen=True)
class RecipeOverrides:
    """mergekit-evolve options that change the recipe's ``evolve:`` settings for one run."""

    sigma0: float | None = None
    task_search_path: tuple[str, ...] = ()
    random_seed: int | None = None
    batch_size: int | None = None

    def __bool__(self) -> bool:
        return self != RecipeOverrides()

    def apply(self, recipe: Recipe) -> Recipe:
        from mergekit_evolve.recipe.evolve_settings import EvolveSettings

        if not self or recipe.evolve is None:
            return recipe
        settings = recipe.evolve.model_dump()
        if self.random_seed is not None:
            settings["seed"] = self.random_seed
        if self.batch_size is not None:
            settings["batch_size"] = self.batch_size
        # given on the command line, so relative to the working directory, not to the recipe
        settings["task_paths"] += [str(Path(p).resolve()) for p in self.task_search_path]
        if self.sigma0 is not None:
            if recipe.evolve.sampler not in ("cma", "cmaes"):
                raise click.UsageError(f"--sigma0 is CMA-ES's initial step size, but the recipe's sampler is '{recipe.evolve.sampler}'")
            settings["sampler_options"] = {**settings["sampler_options"], "sigma0": self.sigma0}
        return dataclasses.replace(recipe, evolve=EvolveSettings.model_validate(settings))


_LEGACY = [
    click.option("--storage-path", type=click.Path(file_okay=False, path_type=Path), hidden=True,
                 help="mergekit-evolve compatibility: the same as --run-dir."),
    click.option("--max-fevals", type=int, hidden=True,
                 help="mergekit-evolve compatibility: the same as --trials."),
    click.option("--sigma0", type=float, hidden=True,
                 help="mergekit-evolve compatibility: evolve.sampler_options.sigma0 (CMA-ES step size, in units of each range)."),
    click.option("--task-search-path", multiple=True, hidden=True,
                 help="mergekit-evolve compatibility: added to evolve.task_paths."),
    click.option("--random-seed", type=int, hidden=True,
                 help="mergekit-evolve compatibility: evolve.seed."),
    click.option("--batch-size", type=int, hidden=True,
                 help="mergekit-evolve compatibility: evolve.batch_size."),
]


def _pick(new: Any, old: Any, new_flag: str, old_flag: str) -> Any:
    if new is not None and old is not None and new != old:
        raise click.UsageError(f"{old_flag} is mergekit-evolve's name for {new_flag}; give only one of them")
    return new if new is not None else old


def legacy_run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add mergekit-evolve's common options to ``run`` (hidden): ``--storage-path`` and
    ``--max-fevals`` become ``run_dir`` and ``trials``; the rest arrive as ``overrides``."""

    @functools.wraps(f)
    def wrapper(*args: Any, storage_path: Path | None, max_fevals: int | None, sigma0: float | None,
                task_search_path: tuple[str, ...], random_seed: int | None, batch_size: int | None, **kwargs: Any) -> Any:
        kwargs["run_dir"] = _pick(kwargs.get("run_dir"), storage_path, "--run-dir", "--storage-path")
        kwargs["trials"] = _pick(kwargs.get("trials"), max_fevals, "--trials", "--max-fevals")
        kwargs["overrides"] = RecipeOverrides(sigma0, tuple(task_search_path), random_seed, batch_size)
        return f(*args, **kwargs)

    for option in reversed(_LEGACY):
        wrapper = option(wrapper)
    return wrapper


def _rebase_to(genome_dir: Path, out_dir: Path) -> Callable[[str], str]:
    """Local model paths in the genome are relative to its folder; keep them valid from ``out_dir``."""
    from mergekit_evolve.recipe.load import resolve_model_path

    if genome_dir == out_dir:
        return lambda m: m
    return lambda m: resolve_model_path(m, genome_dir)


@click.command()
@click.argument("genome", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Recipe file to write (default: print the recipe).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def migrate(genome: Path, output: Path | None, force: bool) -> None:
    """Translate a mergekit-evolve genome file (genome: + tasks:) into an equivalent recipe.

    \b
    The recipe searches the same configs: one dimension per genotype entry (per model,
    parameter, filter and layer group), the tasks as objectives. Running
    `mergekit-evolve GENOME.yml` searches the same translation without writing it.
    """
    from mergekit_evolve.recipe.genome import is_genome, recipe_text, translate_genome
    from mergekit_evolve.recipe.load import parse_recipe
    from mergekit_evolve.recipe.yaml_lines import load_located, load_located_file

    if output is not None and output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to overwrite it")
    try:
        doc = load_located_file(genome)
        if not is_genome(doc.data):
            raise RecipeError("not a mergekit-evolve genome file (it has no 'genome:' section)", str(genome))
        genome_dir = genome.resolve().parent
        out_dir = output.resolve().parent if output is not None else Path.cwd()
        translation = translate_genome(doc, genome_dir, _rebase_to(genome_dir, out_dir))
        text = recipe_text(translation, genome)
        target = output or Path(genome.stem + ".recipe.yml")
        recipe = parse_recipe(load_located(text, str(target)), out_dir / target.name)  # what is written must load
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    for note in translation.notes:
        LOG.warning("%s: %s", genome, note)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    assert recipe.evolve is not None
    click.echo(f"wrote {output}: {len(recipe.space)} search dimensions, objectives "
               f"{', '.join(o.name for o in recipe.evolve.objectives)}; run it with `mergekit-evolve {output}`")
