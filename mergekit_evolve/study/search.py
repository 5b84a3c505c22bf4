"""The search loop: an Optuna study that resumes, fed by one worker, with a progress display."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.sampler.factory import make_sampler
from mergekit_evolve.sampler.generations import GenerationalSampler
from mergekit_evolve.study.objectives import directions
from mergekit_evolve.study.pruning import make_pruner
from mergekit_evolve.study.records import append_record, export_records
from mergekit_evolve.study.storage import default_storage_url, lost_storage, open_storage, register_worker, tagged
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class TooManyFailures(RuntimeError):
    pass


def open_study(recipe: Recipe, run_dir: Path) -> optuna.Study:
    settings = recipe.evolve
    assert settings is not None
    storage = open_storage(settings.storage or default_storage_url(run_dir), settings.heartbeat_grace)
    study = optuna.create_study(
        study_name=settings.study_name or recipe.name,
        storage=storage,
        sampler=make_sampler(settings, recipe.space),
        directions=directions(settings),
        pruner=make_pruner(settings.pruning),
        load_if_exists=True,
    )
    if not study.trials and recipe.space.init_point():
        study.enqueue_trial(recipe.space.init_point(), skip_if_exists=True)
    index = register_worker(study)
    if index and not isinstance(study.sampler, GenerationalSampler):  # those replay one shared seed on purpose
        study.sampler = make_sampler(settings.model_copy(update={"seed": settings.seed + index}), recipe.space)
    return study


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class Reached:
    """Stops the study once it holds ``trials`` counted trials from any worker (as Optuna's
    MaxTrialsCallback), and keeps the trials it read: the progress display shows them without
    reading the study a second time (each read costs a few queries of the storage)."""

    def __init__(self, trials: int):
        self.trials = trials
        self.finished: list[FrozenTrial] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.finished = study.get_trials(deepcopy=False, states=COUNTED)  # other workers add trials too
        if len(self.finished) >= self.trials:
            study.stop()


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

    @property
    def tripped(self) -> bool:
        return self.streak >= self.limit

    def check(self, run_dir: Path) -> None:
        if self.tripped:
            raise TooManyFailures(
                f"{self.limit} candidates failed in a row; the last error was: {(self.last_error or 'unknown').rstrip('.')}. "
                f"Each failure is in {run_dir / 'trials.jsonl'}; fix the recipe and run again to resume."
            )


def search_progress(show_progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), disable=not show_progress, transient=False,
    )


def optimize_until(
    study: optuna.Study, objective: Callable[[optuna.Trial], Any], trials: int, guard: _FailureGuard,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]], timeout: float | None = None,
    reached: Reached | None = None,
) -> None:
    """Run trials until the study holds ``trials`` counted ones (from any worker), the guard trips, or time is up.

    ``reached`` runs before ``callbacks``, so they may read the trials it counted."""
    reached = reached or Reached(trials)
    # Everything alive now (models, tasks, libraries) lives for the whole search: exempt it from
    # the cyclic collector, whose full passes over it stalled random trials by ~0.3 s.
    gc.freeze()
    deadline = time.monotonic() + timeout if timeout else None
    while counted(study) < trials and not guard.tripped:
        if deadline is not None and time.monotonic() >= deadline:
            LOG.info("time budget of %.0f s spent after %d trials", timeout, counted(study))
            break
        try:
            study.optimize(
                objective,
                n_trials=trials - counted(study),
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                catch=(Exception,),
                callbacks=[reached, *callbacks, guard],
            )
        except Exception as e:
            lost = lost_storage(e)
            if lost is None:
                raise
            raise lost from None


def run_search(
    recipe: Recipe, run_dir: Path, worker: Worker, trials: int, show_progress: bool = True, timeout: float | None = None
) -> optuna.Study:
    """Run until the study holds ``trials`` completed trials; an interrupted run resumes here."""
    study = open_study(recipe, run_dir)
    worker.use_store(run_dir)
    export_records(run_dir, study)
    worker.remember(study)
    done = counted(study)
    if done:
        LOG.info("resuming study '%s': %d of %d trials already done", study.study_name, done, trials)
    guard = _FailureGuard(recipe.evolve.max_failures)
    reached = Reached(trials)

    with search_progress(show_progress) as progress:
        bar = progress.add_task(_best_text(study), total=trials, completed=min(done, trials))

        def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            append_record(run_dir, trial)
            _write_sampler_files(study, run_dir)
            progress.update(bar, completed=min(len(reached.finished), trials), description=_best_text(study, reached.finished))

        optimize_until(study, tagged(worker.objective), trials, guard, [on_trial], timeout, reached)
    guard.check(run_dir)
    export_records(run_dir, study)
    _write_sampler_files(study, run_dir)
    return study


def _write_sampler_files(study: optuna.Study, run_dir: Path) -> None:
    """Samplers with state worth keeping in the run folder (CycleQD's archives.json) write it."""
    writer = getattr(study.sampler, "write_run_files", None)
    if writer is not None:
        writer(run_dir, study)


def _best_text(study: optuna.Study, finished: list[FrozenTrial] | None = None) -> str:
    """The best trial so far, among ``finished`` when the caller has just read them."""
    if len(study.directions) > 1:
        return f"Pareto front: {len(study.best_trials)} trials"
    if finished is None:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if not complete:
        return "no completed trial yet"
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    best = pick(complete, key=lambda t: t.value)
    return f"best {best.value:.4f} (trial {best.number})"
