"""``mergekit-evolve merge``: mergekit-yaml with this package's merge methods registered.

Any trial's stored config (``--trial N --run RUN_DIR``) merges to the model that trial scored:
the config is the one the worker materialised, and the run's seed is used for the random
merge methods (DARE, DELLA, ...) unless ``--random-seed`` says otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_evolve.merge.layer_types import layer_types_fixed
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe.document import load_document
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.genome import DEFAULT_SEED, is_genome
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.runfolder import RunFolder

LOG = logging.getLogger("mergekit_evolve")
USAGE = """Merge a concrete mergekit config into OUT_PATH, as mergekit-yaml does, with this
package's merge methods available.

\b
mergekit-evolve merge CONFIG.yml OUT_PATH          a plain mergekit config (or a recipe without annotations)
mergekit-evolve merge --trial N --run RUN OUT_PATH  the config stored with trial N of a run
"""


def config_from_file(path: Path) -> MergeConfiguration:
    """A concrete config (a recipe without search annotations); relative model folders are the file's."""
    document = load_document(path)
    if document.genome:
        raise RecipeError(
            "a mergekit-evolve genome file describes a search, not one merge: run it with "
            f"`mergekit-evolve {path}`, then merge a trial with --trial N --run RUN_DIR",
            str(path),
        )
    recipe = document.recipe()
    if recipe.search_space:
        first = recipe.search_space.placements[0].loc
        raise recipe.error(
            first,
            f"the config has {len(recipe.search_space)} search dimensions "
            f"({', '.join(list(recipe.search_space.dimensions)[:3])}...); "
            "`merge` needs a concrete config: search it with `mergekit-evolve run`, "
            "then merge a trial with --trial N --run RUN_DIR",
        )
    return recipe.compile({})


def _trial_record(run_dir: Path, trial: int) -> dict[str, Any]:
    path = RunFolder(run_dir).trials
    if not path.is_file():
        raise RecipeError(f"no {path.name}: not a mergekit-evolve run folder, or no trial has finished yet",
                          str(run_dir))
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["number"]] = record  # the last line of a trial wins
    if trial not in records:
        known = sorted(records)
        have = f"trials {known[0]}..{known[-1]}" if known else "no trials"
        raise RecipeError(f"the run has no trial {trial} (it has {have})", str(path))
    record = records[trial]
    if not record.get("config"):
        raise RecipeError(
            f"trial {trial} ({record['state']}) stored no config; it failed before compiling: {record.get('error')}",
            str(path),
        )
    if record["state"] != "COMPLETE":
        LOG.warning("trial %d is %s (%s); merging its config anyway", trial, record["state"], record.get("error"))
    return record


def run_seed(run_dir: Path) -> int | None:
    """The seed the run's workers merged with (its recipe copy's ``evolve.seed``)."""
    copy = RunFolder(run_dir).recipe
    data = yaml.safe_load(copy.read_text(encoding="utf-8")) if copy.is_file() else None
    if is_genome(data):
        return DEFAULT_SEED
    evolve = data.get("evolve") if isinstance(data, dict) else None
    if not isinstance(evolve, dict):
        return None
    return int(evolve.get("seed", EvolveSettings.model_fields["seed"].default))


def trial_config(run_dir: Path, trial: int) -> MergeConfiguration:
    return MergeConfiguration.model_validate(yaml.safe_load(_trial_record(run_dir, trial)["config"]))


def _merge(merge_options: MergeOptions, paths: tuple[str, ...], trial: int | None, run_dir: Path | None) -> None:
    if (trial is None) != (run_dir is None):
        raise click.UsageError("--trial and --run go together: --trial N --run RUN_DIR")
    expected = 1 if trial is not None else 2
    if len(paths) != expected:
        usage = "--trial N --run RUN_DIR OUT_PATH" if trial is not None else "CONFIG OUT_PATH"
        raise click.UsageError(f"expected {usage}, got {len(paths)} path(s): {' '.join(paths)}")
    out_path = Path(paths[-1])
    merge_options.apply_global_options()
    register_plugins()
    try:
        if trial is not None:
            assert run_dir is not None
            config = trial_config(run_dir, trial)
            seed = run_seed(run_dir)
            if merge_options.random_seed is None and seed is not None:
                click.echo(f"merging with the run's seed {seed}, as its trials were (--random-seed overrides it)",
                           err=True)
                merge_options = merge_options.model_copy(update={"random_seed": seed})
        else:
            config = config_from_file(Path(paths[0]))
    except RecipeError as e:
        raise click.ClickException(str(e)) from None
    with layer_types_fixed():
        run_merge(config, str(out_path), options=merge_options)
    click.echo(f"merged into {out_path}")


@click.command("merge", cls=PrettyPrintHelp, help=USAGE)
@click.argument("paths", nargs=-1, required=True, metavar="[CONFIG] OUT_PATH")
@click.option("--trial", type=click.IntRange(min=0), default=None,
              help="Merge the stored config of this trial of --run (instead of CONFIG).")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="The run folder --trial refers to.")
@add_merge_options
def merge(merge_options: MergeOptions, paths: tuple[str, ...], trial: int | None, run_dir: Path | None) -> None:
    _merge(merge_options, paths, trial, run_dir)
