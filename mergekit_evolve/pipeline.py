"""recipe -> worker -> study -> winner, report and plot in the run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mergekit_evolve.evaluate.lm_eval_suite import TaskSetupError
from mergekit_evolve.merge.resident import ModelNotFoundError
from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.winner import plot_history, winner_config, write_best, write_report
from mergekit_evolve.sampler.factory import SamplerSetupError, make_sampler
from mergekit_evolve.study.run_dir import RunDirError, check_run_dir, prepare_run_dir
from mergekit_evolve.study.search import TooManyFailures, run_search
from mergekit_evolve.study.worker import Worker, merge_options

LOG = logging.getLogger(__name__)
SETUP_ERRORS = (RecipeError, ModelNotFoundError, TaskSetupError, SamplerSetupError, RunDirError)


class RunFailed(RuntimeError):
    pass


def run_recipe(
    recipe: Recipe, run_dir: Path, *, trials: int | None = None, device: str | None = None, overwrite: bool = False,
    trust_remote_code: bool = False, allow_pickle: bool = False, show_progress: bool = True,
) -> dict[str, Any]:
    assert recipe.evolve is not None
    options = merge_options(recipe, device, trust_remote_code)
    try:
        # Everything that can be wrong with the input is found before the run folder is touched.
        check_run_dir(run_dir, recipe, overwrite)
        make_sampler(recipe.evolve, recipe.space)
        worker = Worker(recipe, options, allow_pickle=allow_pickle)
        prepare_run_dir(run_dir, recipe, overwrite)
    except SETUP_ERRORS as e:
        raise RunFailed(str(e)) from None
    try:
        study = run_search(recipe, run_dir, worker, trials or recipe.evolve.trials, show_progress)
    except TooManyFailures as e:
        raise RunFailed(str(e)) from None
    LOG.info("writing the winner (trial %d) to %s", study.best_trial.number, run_dir / "best")
    write_best(run_dir, recipe, winner_config(study.best_trial), options)
    plot_history(run_dir, study)
    report = write_report(run_dir, study, worker)
    return {**report, "run_dir": str(run_dir)}
