"""The ``mergekit-evolve`` command."""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from mergekit_evolve.commands.export import export
from mergekit_evolve.commands.merge import merge
from mergekit_evolve.commands.migrate import RecipeOverrides, legacy_run_options, migrate
from mergekit_evolve.commands.publish import publish
from mergekit_evolve.commands.space import space
from mergekit_evolve.recipe.yaml_lines import RecipeError

LOG = logging.getLogger("mergekit_evolve")
console = Console(stderr=True)


class _DefaultToRun(click.Group):
    """``mergekit-evolve RECIPE`` means ``mergekit-evolve run RECIPE``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _version_text() -> str:
    return (
        f"mergekit-evolve {dist_version('mergekit-evolve')} (evolutionary merge search; "
        f"this is not mergekit's deprecated mergekit-evolve), mergekit {dist_version('mergekit')}, "
        f"optuna {dist_version('optuna')}, lm-eval {dist_version('lm_eval')}"
    )


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    LOG.setLevel(logging.INFO if verbose == 0 else level)
    for noisy in ("optuna", "lm_eval", "lm-eval", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    if verbose < 2:
        # Optuna logs every trial through its own handler and flags the heartbeat API as
        # experimental; the progress bar and trials.jsonl already say all of it.
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
        import transformers

        transformers.logging.set_verbosity_error()  # mergekit passes transformers' deprecated torch_dtype


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message="%(version)s", version=_version_text())
def cli() -> None:
    """Evolutionary model merging for mergekit.

    \b
    mergekit-evolve RECIPE.yml            search, then write the winner (same as `run`)
    mergekit-evolve RECIPE.yml --dry-run  validate, print the space and one config

    A recipe is a mergekit config whose values may be search annotations
    ({search: [0, 1]}, {choice: [ties, dare_ties]}, ...) plus an `evolve:` section
    naming the sampler, the trial budget and the lm-eval objectives.
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<recipe name>). Running again resumes it.")
@click.option("--trials", type=int, default=None, help="Override evolve.trials (completed trials to reach).")
@click.option("--timeout", type=float, default=None, help="Stop starting new trials after this many seconds (then write the winner).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: evolve.device, else auto).")
@click.option("--dry-run", is_flag=True, help="Validate the recipe, print the search space and one compiled config; load no weights.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run folder of a different recipe instead of refusing.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from model repos to run (as in mergekit).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading .bin/.pt pickle checkpoints (they can run code).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes, each with its own resident model (default: evolve.workers, 1). With --ray: actors.")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", default=None,
              help="Run the workers as Ray actors, one per GPU: 'auto' joins the running cluster or starts a local one.")
@click.option("--storage", metavar="URL", default=None,
              help="Study storage (default: evolve.storage, else study.db in the run folder): sqlite:///F, journal:F, "
                   "postgresql://... Processes that share it share the search.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@legacy_run_options  # mergekit-evolve's --storage-path, --max-fevals, --sigma0, ... (hidden)
def run(recipe: Path, run_dir: Path | None, trials: int | None, timeout: float | None, device: str | None, dry_run: bool, overwrite: bool,
        trust_remote_code: bool, allow_pickle: bool, no_progress: bool, workers: int | None, ray_address: str | None,
        storage: str | None, verbose: int, overrides: RecipeOverrides) -> None:
    """Search the recipe's space, then write best/, report.json and plots to the run folder.

    RECIPE may also be a genome file of mergekit's deprecated mergekit-evolve (see `migrate`);
    that command's --storage-path, --max-fevals, --sigma0, --task-search-path, --random-seed
    and --batch-size are accepted too.
    """
    _setup_logging(verbose)
    from mergekit_evolve.recipe.load import load_recipe
    from mergekit_evolve.stages import load_stages

    run_dir = run_dir or Path("runs") / recipe.stem
    try:
        stages = load_stages(recipe, run_dir)  # [] unless the recipe has `stages:`
        if stages and overrides:
            raise click.UsageError("--sigma0, --task-search-path, --random-seed and --batch-size apply to single recipes, not stages")
        loaded = None if stages else overrides.apply(load_recipe(recipe))
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        for stage in stages:
            click.echo(f"# stage '{stage.name}' (run folder {stage.run_dir})")
            _print_dry_run(stage.recipe)
        if loaded is not None:
            _print_dry_run(loaded)
        return
    if loaded is not None and loaded.evolve is None:
        raise click.ClickException(f"{recipe}: no search annotations and no 'evolve:' section; use `mergekit-evolve merge` for a plain merge")
    from mergekit_evolve.pipeline import RunFailed, run_recipe
    from mergekit_evolve.stages import run_stages
    from mergekit_evolve.study.storage import StorageLost

    options = dict(trials=trials, timeout=timeout, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                   allow_pickle=allow_pickle, show_progress=not no_progress, workers=workers, ray=ray_address, storage=storage)
    try:
        reports = run_stages(recipe, run_dir, **options) if stages else [run_recipe(loaded, run_dir, **options)]
    except (RunFailed, StorageLost) as e:  # StorageLost: the database went away during the run, at any step
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished trials are kept in the study; run the same command to resume.")
        sys.exit(130)
    for report in reports:
        _print_report(report)


def _print_dry_run(recipe) -> None:
    from mergekit_evolve.compile import compile_point
    from mergekit_evolve.sampler.factory import SamplerSetupError, prepare_recipe

    if recipe.evolve:
        try:
            recipe = prepare_recipe(recipe)  # the space its sampler searches (CycleQD adds its mutation)
        except SamplerSetupError as e:
            raise click.ClickException(str(e)) from None
    space = recipe.space
    table = Table(title=f"search space of {recipe.path.name}: {len(space)} dimensions")
    table.add_column("dimension")
    table.add_column("values")
    for name, dim in space.dimensions.items():
        table.add_row(name, dim.describe())
    Console().print(table)
    config = compile_point(recipe, space.default_point())
    click.echo("# one compiled config (init values, else mid-range, else the first choice):")
    click.echo(config.to_yaml())
    if recipe.evolve:
        click.echo(f"# sampler: {recipe.evolve.sampler}, trials: {recipe.evolve.trials}, "
                   f"objectives: {', '.join(o.name for o in recipe.evolve.objectives)}")


def _print_report(report: dict) -> None:
    stage = f"stage {report['stage']}: " if "stage" in report else ""
    table = Table(title=f"{stage}winner (trial {report['winner']['trial']}) vs sources", caption=f"objective: {report['objective']}")
    table.add_column("model")
    table.add_column("search", justify="right")
    table.add_column("held-out", justify="right")
    table.add_row("[bold]winner", f"{report['winner']['search']:.4f}", f"[bold]{report['winner']['heldout']:.4f}")
    for name, row in report["sources"].items():
        table.add_row(Path(name).name if Path(name).is_absolute() else name, f"{row['search']:.4f}", f"{row['heldout']:.4f}")
    Console().print(table)
    click.echo(f"run folder: {report['run_dir']}")


cli.add_command(publish)
cli.add_command(merge)
cli.add_command(migrate)
cli.add_command(space)
cli.add_command(export)


def main() -> None:
    # lm-eval and mergekit draw a tqdm bar per call; the search shows one rich bar instead.
    # tqdm reads this when first imported, so it is set before any of them loads.
    if "-v" not in sys.argv and "-vv" not in sys.argv:
        os.environ.setdefault("TQDM_DISABLE", "1")
    cli(prog_name="mergekit-evolve")
