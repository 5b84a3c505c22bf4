"""``mergekit-evolve run RECIPE`` (or just ``mergekit-evolve RECIPE``): search, then write the winner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mergekit_evolve.commands.common import console, print_report, setup_logging
from mergekit_evolve.commands.migrate import legacy_run_options
from mergekit_evolve.merge.resident import ModelNotFoundError
from mergekit_evolve.pipeline import (
    SETUP_ERRORS,
    RunFailed,
    RunOptions,
    run_recipe,
    run_stages,
)
from mergekit_evolve.preflight import check_recipe
from mergekit_evolve.recipe.document import load_document
from mergekit_evolve.recipe.overrides import Overrides
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.stages import winner_dir
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.samplers.registry import prepare_recipe
from mergekit_evolve.study.storage import StorageLost
from mergekit_evolve.study.worker import merge_options, plan_memory


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<recipe name>). Running again resumes it.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Override evolve.trials (completed trials to reach).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting new trials after this many seconds (then write the winner).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: evolve.device, else auto).")
@click.option("--dry-run", is_flag=True,
              help="Validate the recipe, print the search space and one compiled config; load no weights.")
@click.option("--overwrite", is_flag=True,
              help="Delete an existing run folder of a different recipe instead of refusing.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from model repos to run (as in mergekit).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading .bin/.pt pickle checkpoints (they can run code).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes, each with its own resident model (default: evolve.workers, 1). "
                   "With --ray: actors.")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", default=None,
              help="Run the workers as Ray actors, one per GPU: 'auto' joins the running cluster "
                   "or starts a local one.")
@click.option("--storage", metavar="URL", default=None,
              help="Study storage (default: evolve.storage, else study.db in the run folder): sqlite:///F, journal:F, "
                   "postgresql://... Processes that share it share the search.")
@click.option("--no-publish", is_flag=True,
              help="Skip the recipe's publish: push (and its token check); "
                   "publish later with `mergekit-evolve publish`.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@legacy_run_options  # mergekit-evolve's --storage-path, --max-fevals, --sigma0, ... (hidden)
def run(recipe: Path, run_dir: Path | None, timeout: float | None, dry_run: bool, overwrite: bool,
        trust_remote_code: bool, allow_pickle: bool, no_progress: bool, ray_address: str | None, no_publish: bool,
        verbose: int, overrides: Overrides) -> None:
    """Search the recipe's space, then write best/, report.json and plots to the run folder.

    RECIPE may also be a genome file of mergekit's deprecated mergekit-evolve (see `migrate`);
    that command's --storage-path, --max-fevals, --sigma0, --task-search-path, --random-seed
    and --batch-size are accepted too.
    """
    setup_logging(verbose)
    run_dir = run_dir or Path("runs") / recipe.stem
    try:
        document = load_document(recipe).with_overrides(overrides)
        stages = document.stages(run_dir) if document.staged else []
        single = None if stages else document.recipe()
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        for stage in stages:
            click.echo(f"# stage '{stage.name}' (run folder {stage.run_dir})")
            # the winners of earlier stages do not exist yet: the run checks them when it gets there
            _print_dry_run(stage.recipe, trust_remote_code, allow_pickle,
                           pending=tuple(winner_dir(run_dir, name) for name in stage.uses))
        if single is not None:
            _print_dry_run(single, trust_remote_code, allow_pickle)
        return
    if single is not None and single.evolve is None:
        raise click.ClickException(f"{recipe}: no search annotations and no 'evolve:' section; "
                                   "use `mergekit-evolve merge` for a plain merge")
    options = RunOptions(timeout=timeout, overwrite=overwrite, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle, show_progress=not no_progress, ray=ray_address,
                         publish=not no_publish)
    try:
        reports = run_stages(document, run_dir, options) if stages else [run_recipe(single, run_dir, options)]
    except (RunFailed, StorageLost) as e:  # StorageLost: the database went away during the run, at any step
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished trials are kept in the study; run the same command to resume.")
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything is unwound (the lock released, the trial failed); an interrupt that lands inside
        # Optuna's trial shutdown can leave its heartbeat thread (not a daemon) beating, and a normal
        # exit would wait for it forever. The SQLite files are safe to leave as a kill would.
        os._exit(130)
    for report in reports:
        print_report(report)


def _print_dry_run(recipe: Recipe, trust_remote_code: bool, allow_pickle: bool, pending: tuple[Path, ...] = ()) -> None:
    try:
        if recipe.evolve:
            recipe = prepare_recipe(recipe)  # the space its sampler searches (CycleQD adds its mutation)
        check_recipe(recipe, merge_options(recipe, trust_remote_code), allow_pickle, pending, dry_run=True)
    except SETUP_ERRORS as e:
        raise click.ClickException(str(e)) from None
    space = recipe.search_space
    table = Table(title=f"search space of {recipe.path.name}: {len(space)} dimensions")
    table.add_column("dimension")
    table.add_column("values")
    for name, dim in space.dimensions.items():
        table.add_row(name, dim.describe())
    Console().print(table)
    config = recipe.compile(space.default_point())
    click.echo("# one compiled config (init values, else mid-range, else the first choice):")
    click.echo(config.to_yaml())
    if recipe.evolve:
        click.echo(f"# sampler: {recipe.evolve.sampler}, trials: {recipe.evolve.trials}, "
                   f"objectives: {', '.join(o.name for o in recipe.evolve.objectives)}")
        try:
            plan = plan_memory(recipe, merge_options(recipe))
        except (ModelNotFoundError, OSError) as e:  # a model not there yet: the rest still validates
            click.echo(f"# memory plan: unavailable ({e})")
        else:
            click.echo("\n".join(f"# {line}" for line in plan.lines()))
