"""recipe -> worker -> study -> winner, report and plot in the run folder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from mergekit_evolve.evaluate.lm_eval_suite import TaskSetupError
from mergekit_evolve.merge.resident import ModelNotFoundError
from mergekit_evolve.publish.card import write_card
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.hub import publish_run, resolve_token
from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.finalists import best_of_finalists
from mergekit_evolve.report.pareto import select_trial, weighted_target, write_pareto
from mergekit_evolve.report.winner import plot_history, winner_config, write_best, write_report
from mergekit_evolve.sampler.factory import SamplerSetupError, prepare_recipe
from mergekit_evolve.study.parallel import ParallelError, WorkerJob, plan_workers, run_parallel
from mergekit_evolve.study.run_dir import RunDirError, check_run_dir, prepare_run_dir
from mergekit_evolve.study.search import TooManyFailures, run_search
from mergekit_evolve.study.storage import StorageError, check_storage, close_storage
from mergekit_evolve.study.worker import Worker, merge_options

LOG = logging.getLogger(__name__)
SETUP_ERRORS = (RecipeError, ModelNotFoundError, TaskSetupError, SamplerSetupError, RunDirError, PublishError,
                ParallelError, StorageError)


class RunFailed(RuntimeError):
    pass


def run_recipe(
    recipe: Recipe, run_dir: Path, *, trials: int | None = None, timeout: float | None = None, device: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False, allow_pickle: bool = False, show_progress: bool = True,
    workers: int | None = None, ray: str | None = None, storage: str | None = None,
) -> dict[str, Any]:
    assert recipe.evolve is not None
    if storage:  # --storage: the same as evolve.storage
        recipe = dataclasses.replace(recipe, evolve=recipe.evolve.model_copy(update={"storage": storage}))
    options = merge_options(recipe, device, trust_remote_code)
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)
    try:
        # Everything that can be wrong with the input is found before the run folder is touched.
        recipe = prepare_recipe(recipe)  # checks the sampler fits; CycleQD adds its mutation
        check_run_dir(run_dir, recipe, overwrite)
        if recipe.publish and recipe.publish.repo:
            resolve_token()  # the push at the end needs one: say so now, not after the search
        plan = plan_workers(recipe.evolve, workers, ray)
        if recipe.evolve.storage:
            check_storage(recipe.evolve.storage)
        worker = Worker(recipe, options, allow_pickle=allow_pickle)
        prepare_run_dir(run_dir, recipe, overwrite)
    except SETUP_ERRORS as e:
        raise RunFailed(str(e)) from None
    try:
        if plan.parallel:
            job = WorkerJob.for_run(recipe, run_dir, options, allow_pickle, trials or recipe.evolve.trials, timeout)
            study = run_parallel(plan, recipe, run_dir, worker, job, show_progress)
        else:
            study = run_search(recipe, run_dir, worker, trials or recipe.evolve.trials, show_progress, timeout=timeout)
    except (TooManyFailures, ParallelError) as e:
        raise RunFailed(str(e)) from None
    best = select_trial(study, recipe.evolve) if recipe.evolve.multi_objective else best_of_finalists(study, worker)
    LOG.info("writing the winner (trial %d) to %s", best.number, run_dir / "best")
    write_best(run_dir, run_dir / "recipe.yml", winner_config(best), options)
    if recipe.evolve.multi_objective:
        plot_history(run_dir, study, target=weighted_target(recipe.evolve))
        write_pareto(run_dir, study, recipe.evolve, best)
    else:
        plot_history(run_dir, study)
    report = write_report(run_dir, study, worker, best)
    write_card(run_dir)  # needs report.json; replaces mergekit's plain card
    worker.evaluator.store.close()
    close_storage(study)  # before a push: study.db must hold every trial, not leave some in its WAL
    if recipe.publish and recipe.publish.repo:
        try:
            publish_run(run_dir, recipe.publish)
        except PublishError as e:
            raise RunFailed(f"the run is complete in {run_dir}, but publishing failed: {e}") from None
    return {**report, "run_dir": str(run_dir)}
