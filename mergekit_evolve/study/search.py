"""The search loop: an Optuna study that resumes, fed by one worker, with a progress display."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.sampler.factory import make_sampler
from mergekit_evolve.study.records import append_record, export_records
from mergekit_evolve.study.storage import default_storage_url, open_storage
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class TooManyFailures(RuntimeError):
    pass


def open_study(recipe: Recipe, run_dir: Path) -> optuna.Study:
    settings = recipe.evolve
    assert settings is not None
    storage = open_storage(settings.storage or default_storage_url(run_dir))
    study = optuna.create_study(
        study_name=settings.study_name or recipe.name,
        storage=storage,
        sampler=make_sampler(settings, recipe.space),
        direction="maximize",
        load_if_exists=True,
    )
    if not study.trials and recipe.space.init_point():
        study.enqueue_trial(recipe.space.init_point(), skip_if_exists=True)
    return study


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class _FailureGuard:
    """Stops the study after ``limit`` failed candidates in a row (a broken recipe, not bad luck)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.last_error: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.streak += 1
            self.last_error = trial.user_attrs.get("error")
            LOG.warning("trial %d failed: %s", trial.number, self.last_error or "see log")
            if self.streak >= self.limit:
                study.stop()
        else:
            self.streak = 0


def run_search(recipe: Recipe, run_dir: Path, worker: Worker, trials: int, show_progress: bool = True) -> optuna.Study:
    """Run until the study holds ``trials`` completed trials; an interrupted run resumes here."""
    study = open_study(recipe, run_dir)
    export_records(run_dir, study)
    worker.remember(study)
    done = counted(study)
    if done:
        LOG.info("resuming study '%s': %d of %d trials already done", study.study_name, done, trials)
    guard = _FailureGuard(recipe.evolve.max_failures)

    with Progress(
        TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), disable=not show_progress, transient=False,
    ) as progress:
        bar = progress.add_task(_best_text(study), total=trials, completed=min(done, trials))

        def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            append_record(run_dir, trial)
            progress.update(bar, completed=min(counted(study), trials), description=_best_text(study))

        while counted(study) < trials and guard.streak < guard.limit:
            study.optimize(
                worker.objective,
                n_trials=trials - counted(study),
                catch=(Exception,),
                callbacks=[on_trial, guard],
            )
    if guard.streak >= guard.limit:
        raise TooManyFailures(
            f"{guard.limit} candidates failed in a row; the last error was: {guard.last_error}. "
            f"Each failure is in {run_dir / 'trials.jsonl'}; fix the recipe and run again to resume."
        )
    export_records(run_dir, study)
    return study


def _best_text(study: optuna.Study) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "no completed trial yet"
    return f"best {best.value:.4f} (trial {best.number})"
