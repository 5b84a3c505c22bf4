"""``mergekit-evolve export RUN_DIR --trial N -o OUT``: any trial of a run as a Hugging Face model folder.

Written as ``best/`` is (``write_best``: a plain mergekit merge of the trial's stored config
with the run's seed, plus the recipe copy), so a multi-objective run's other Pareto models,
or any trial at all, can be kept next to the chosen winner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from mergekit.options import MergeOptions

from mergekit_evolve.commands.merge import run_seed, trial_config
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.winner import write_best
from mergekit_evolve.runfolder import RunFolder

LOG = logging.getLogger("mergekit_evolve")


def _pareto_trials(run_dir: Path) -> list[int]:
    path = RunFolder(run_dir).pareto
    if not path.is_file():
        raise click.ClickException(f"{run_dir} has no {path.name}: --pareto needs a finished multi-objective run")
    return [row["trial"] for row in json.loads(path.read_text(encoding="utf-8"))["front"]]


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--trial", "trials", type=click.IntRange(min=0), multiple=True,
              help="A trial number (repeat for several).")
@click.option("--pareto", is_flag=True, help="Every trial of the run's Pareto front (pareto.json).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder; with --pareto or several trials, one OUT/trial-N folder each.")
@click.option("--device", default="cpu", show_default=True, help="Where mergekit merges (cpu, cuda, ...).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from model repos to run (as in mergekit).")
def export(run_dir: Path, trials: tuple[int, ...], pareto: bool, out: Path, device: str,
           trust_remote_code: bool) -> None:
    """Merge trials of RUN_DIR into model folders, as best/ is written."""
    numbers = list(dict.fromkeys([*trials, *(_pareto_trials(run_dir) if pareto else [])]))
    if not numbers:
        raise click.UsageError("name the trials to export: --trial N (repeatable) or --pareto")
    register_plugins()  # stored configs may use this package's merge methods
    options = MergeOptions(device=device, random_seed=run_seed(run_dir), trust_remote_code=trust_remote_code,
                           quiet=True)
    for number in numbers:
        try:
            config = trial_config(run_dir, number)
        except RecipeError as e:
            raise click.ClickException(str(e)) from None
        target = out / f"trial-{number}" if pareto or len(numbers) > 1 else out
        target.parent.mkdir(parents=True, exist_ok=True)
        write_best(run_dir, RunFolder(run_dir).recipe, config, options, out=target)
        click.echo(f"trial {number} -> {target}")
