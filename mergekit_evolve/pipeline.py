"""The whole run, in data-flow order: recipe -> sampler -> worker -> study -> winner, report -> publish.

``run_recipe`` runs one search in a run folder; ``run_stages`` runs a staged recipe's searches
in order, each in its own sub-folder, a later one merging an earlier one's winner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from mergekit_evolve.evaluate.suite import TaskSetupError
from mergekit_evolve.merge.resident import ModelNotFoundError, WeightsError
from mergekit_evolve.preflight import check_recipe
from mergekit_evolve.publish.card import write_card
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.hub import publish_run, resolve_token
from mergekit_evolve.recipe.document import RecipeDocument
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.stages import Stage
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.finalists import best_of_finalists
from mergekit_evolve.report.pareto import select_trial, weighted_target, write_pareto
from mergekit_evolve.report.winner import (
    plot_history,
    winner_config,
    write_best,
    write_report,
)
from mergekit_evolve.runfolder import RunDirError, RunFolder
from mergekit_evolve.samplers.registry import SamplerSetupError, prepare_recipe
from mergekit_evolve.study.jobs import (
    ParallelError,
    WorkerJob,
    plan_workers,
    run_parallel,
)
from mergekit_evolve.study.parallel import run_local
from mergekit_evolve.study.ray_actors import run_ray
from mergekit_evolve.study.search import TooManyFailures, counted, run_search
from mergekit_evolve.study.storage import (
    StorageError,
    check_storage,
    close_storage,
    default_storage_url,
    open_storage,
)
from mergekit_evolve.study.worker import Worker, merge_options

LOG = logging.getLogger(__name__)
SETUP_ERRORS = (RecipeError, ModelNotFoundError, WeightsError, TaskSetupError, SamplerSetupError, RunDirError,
                PublishError, ParallelError, StorageError)


class RunFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to search: that is the recipe, with any command-line overrides applied)."""

    timeout: float | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    show_progress: bool = True
    ray: str | None = None  # "auto" or a cluster address: the workers as Ray actors


def run_recipe(recipe: Recipe, run_dir: Path, options: RunOptions = RunOptions()) -> dict[str, Any]:
    assert recipe.evolve is not None
    folder = RunFolder(run_dir)
    merge = merge_options(recipe, options.trust_remote_code)
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)
    try:
        # Everything that can be wrong with the input is found before the run folder is touched.
        recipe = prepare_recipe(recipe)  # checks the sampler fits; CycleQD adds its mutation
        folder.check(recipe.fingerprint(), options.overwrite)
        if recipe.publish and recipe.publish.repo:
            resolve_token()  # the push at the end needs one: say so now, not after the search
        plan = plan_workers(recipe.evolve, options.ray)
        if recipe.evolve.storage:
            check_storage(recipe.evolve.storage)
        suite = check_recipe(recipe, merge, options.allow_pickle)  # files, architectures, tasks: no weights yet
        worker = Worker(recipe, merge, allow_pickle=options.allow_pickle, suite=suite)
        folder.prepare(recipe.fingerprint(), recipe.path, recipe.text, options.overwrite)
    except SETUP_ERRORS as e:
        raise RunFailed(str(e)) from None
    trials = recipe.evolve.trials
    try:
        if plan.parallel:
            job = WorkerJob.for_run(recipe, run_dir, merge, options.allow_pickle, trials, options.timeout)
            runner = run_ray if plan.ray is not None else run_local
            study = run_parallel(plan, recipe, run_dir, worker, job, runner, options.show_progress)
        else:
            study = run_search(recipe, run_dir, worker, trials, options.show_progress, timeout=options.timeout)
    except (TooManyFailures, ParallelError) as e:
        raise RunFailed(str(e)) from None
    best = select_trial(study, recipe.evolve) if recipe.evolve.multi_objective else best_of_finalists(study, worker)
    LOG.info("writing the winner (trial %d) to %s", best.number, folder.best)
    write_best(run_dir, folder.recipe, winner_config(best), merge)
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


# --- staged recipes ---------------------------------------------------------------------------


def _digest(stage: RunFolder) -> str:
    """Which winner a stage wrote: the digest of its concrete config."""
    return hashlib.sha256(stage.best_config.read_bytes()).hexdigest()[:16]


def _check_upstream(stage: Stage, run_dir: Path, overwrite: bool) -> None:
    """Refuse (or restart with ``overwrite``) a stage searched with an earlier winner than today's."""
    state_file = RunFolder(run_dir).stages_state
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    current = {name: _digest(RunFolder(run_dir).stage(name)) for name in stage.uses}
    before = state.get(stage.name)
    if before is not None and before != current and stage.run_dir.exists():
        changed = ", ".join(n for n in current if before.get(n) != current[n])
        if not overwrite:
            raise RunFailed(
                f"stage '{stage.name}' in {stage.run_dir} was searched with an earlier winner of stage {changed}; "
                f"pass --overwrite to restart stage '{stage.name}', or choose another --run-dir"
            )
        LOG.warning("stage %s: the winner of %s changed; restarting it", stage.name, changed)
        shutil.rmtree(stage.run_dir)
    state[stage.name] = current
    state_file.write_text(json.dumps(state, indent=2))


def _finished(stage: Stage) -> dict[str, Any] | None:
    """The report of a stage that already reached its trials with this recipe, else None."""
    folder = RunFolder(stage.run_dir)
    if not (folder.report.exists() and folder.best.exists()):
        return None
    if folder.stored_fingerprint() != stage.recipe.fingerprint():
        return None
    settings = stage.recipe.evolve
    assert settings is not None
    storage = open_storage(settings.storage or default_storage_url(stage.run_dir))
    try:
        study = optuna.load_study(study_name=settings.study_name or stage.recipe.name, storage=storage)
    except KeyError:
        return None
    return json.loads(folder.report.read_text()) if counted(study) >= settings.trials else None


def run_stages(document: RecipeDocument, run_dir: Path, options: RunOptions = RunOptions()) -> list[dict[str, Any]]:
    """Run every stage in order; returns each stage's report (with ``stage`` and ``run_dir``)."""
    if RunFolder(run_dir).run_file.exists():
        raise RunFailed(f"{run_dir} holds a one-stage run; choose another --run-dir for a staged recipe")

    def parse(until: str | None = None) -> list[Stage]:
        try:
            return document.stages(run_dir, until)
        except RecipeError as e:
            raise RunFailed(str(e)) from None

    reports = []
    for planned in parse():  # every stage is checked before any search
        stage = parse(until=planned.name)[-1]  # again, now that earlier winners exist: real layer counts
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_upstream(stage, run_dir, options.overwrite)
        report = _finished(stage)
        if report is not None:
            LOG.info("stage %s: already finished (%s); not run again", stage.name, stage.run_dir)
            report = {**report, "run_dir": str(stage.run_dir)}
        else:
            LOG.info("stage %s: searching in %s", stage.name, stage.run_dir)
            report = run_recipe(stage.recipe, stage.run_dir, options)
        reports.append({**report, "stage": stage.name})
    return reports
