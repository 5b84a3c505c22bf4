"""Coming from mergekit's deprecated ``mergekit-evolve``: ``migrate`` a genome file, and its CLI options.

``mergekit-evolve migrate GENOME.yml -o recipe.yml`` writes the recipe a genome file stands for
(``mergekit-evolve GENOME.yml`` runs that translation directly). ``run`` also accepts the old
command's common options, each mapped to its counterpart here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mergekit_evolve.recipe.genome import is_genome, recipe_text, translate_genome
from mergekit_evolve.recipe.model_paths import resolve_model_path
from mergekit_evolve.recipe.overrides import Overrides
from mergekit_evolve.recipe.parse import parse_recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError, load_located

LOG = logging.getLogger("mergekit_evolve")


_LEGACY = [
    click.option("--storage-path", type=click.Path(file_okay=False, path_type=Path), hidden=True,
                 help="mergekit-evolve compatibility: the same as --run-dir."),
    click.option("--max-fevals", type=click.IntRange(min=1), hidden=True,
                 help="mergekit-evolve compatibility: the same as --trials."),
    click.option("--sigma0", type=click.FloatRange(min=0, min_open=True), hidden=True,
                 help="mergekit-evolve compatibility: evolve.sampler_options.sigma0 "
                      "(CMA-ES step size, in units of each range)."),
    click.option("--task-search-path", multiple=True, hidden=True,
                 help="mergekit-evolve compatibility: added to evolve.task_paths."),
    click.option("--random-seed", type=int, hidden=True,
                 help="mergekit-evolve compatibility: evolve.seed."),
    click.option("--batch-size", type=click.IntRange(min=1), hidden=True,
                 help="mergekit-evolve compatibility: evolve.batch_size."),
]


def _pick(new: Any, old: Any, new_flag: str, old_flag: str) -> Any:
    if new is not None and old is not None and new != old:
        raise click.UsageError(f"{old_flag} is mergekit-evolve's name for {new_flag}; give only one of them")
    return new if new is not None else old


def legacy_run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add mergekit-evolve's common options to ``run`` (hidden): ``--storage-path`` becomes ``run_dir``;
    the settings that override the recipe's (``--trials``/``--max-fevals``, ``--device``, ``--workers``,
    ``--storage``, ``--sigma0``, ...) arrive together as ``overrides``."""

    @functools.wraps(f)
    def wrapper(*args: Any, storage_path: Path | None, max_fevals: int | None, sigma0: float | None,
                task_search_path: tuple[str, ...], random_seed: int | None, batch_size: int | None,
                trials: int | None, device: str | None, workers: int | None, storage: str | None, **kwargs: Any) -> Any:
        kwargs["run_dir"] = _pick(kwargs.get("run_dir"), storage_path, "--run-dir", "--storage-path")
        given = {
            "trials": _pick(trials, max_fevals, "--trials", "--max-fevals"), "device": device, "workers": workers,
            "storage": storage, "sigma0": sigma0, "task_paths": tuple(task_search_path), "seed": random_seed,
            "batch_size": batch_size,
        }
        kwargs["overrides"] = Overrides(**{k: v for k, v in given.items() if v not in (None, ())})
        return f(*args, **kwargs)

    for option in reversed(_LEGACY):
        wrapper = option(wrapper)
    return wrapper


def _rebase_to(genome_dir: Path, out_dir: Path) -> Callable[[str], str]:
    """Local model paths in the genome are relative to its folder; keep them valid from ``out_dir``."""
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
    if output is not None and output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to overwrite it")
    try:
        text = genome.read_text(encoding="utf-8")
        doc = load_located(text, str(genome))
        if not is_genome(doc.data):
            raise RecipeError("not a mergekit-evolve genome file (it has no 'genome:' section)", str(genome))
        genome_dir = genome.resolve().parent
        out_dir = output.resolve().parent if output is not None else Path.cwd()
        translation = translate_genome(doc, genome_dir, _rebase_to(genome_dir, out_dir))
        text = recipe_text(translation, genome)
        target = output or Path(genome.stem + ".recipe.yml")
        recipe = parse_recipe(load_located(text, str(target)), out_dir / target.name, text)  # what is written must load
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    for note in translation.notes:
        LOG.warning("%s: %s", genome, note)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    assert recipe.evolve is not None
    click.echo(f"wrote {output}: {len(recipe.search_space)} search dimensions, objectives "
               f"{', '.join(o.name for o in recipe.evolve.objectives)}; run it with `mergekit-evolve {output}`")
