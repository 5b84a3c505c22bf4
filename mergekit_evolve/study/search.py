"""The search loop: an Optuna study that resumes, fed by one worker, with a progress display."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from mergekit_evolve.compat.optuna import storage_of, trials_in_flight
from mergekit_evolve.evaluate.scores import directions
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.runfolder import RunFolder
from mergekit_evolve.samplers.generations import GenerationalSampler
from mergekit_evolve.samplers.registry import make_sampler
from mergekit_evolve.study.pruning import make_pruner
from mergekit_evolve.study.records import append_record, export_records
from mergekit_evolve.study.storage import (
    default_storage_url,
    fail_orphans,
    lost_storage,
    open_storage,
    register_worker,
    tagged,
)
from mergekit_evolve.study.worker import Worker, interrupted

LOG = logging.getLogger(__name__)
# `trials` counts completed trials only: a pruned one is cheap extra exploration, not a budget unit
COUNTED = (TrialState.COMPLETE,)


class TooManyFailures(RuntimeError):
    pass


def open_study(recipe: Recipe, run_dir: Path) -> optuna.Study:
    settings = recipe.evolve
    assert settings is not None
    storage = open_storage(settings.storage or default_storage_url(run_dir), settings.heartbeat_grace)
    study = optuna.create_study(
        study_name=settings.study_name or recipe.name,
        storage=storage,
        sampler=make_sampler(settings, recipe.search_space),
        directions=directions(settings),
        pruner=make_pruner(settings.pruning),
        load_if_exists=True,
    )
    if not study.trials and recipe.search_space.init_point():
        study.enqueue_trial(recipe.search_space.init_point(), skip_if_exists=True)
    index = register_worker(study)
    if index and not isinstance(study.sampler, GenerationalSampler):  # those replay one shared seed on purpose
        study.sampler = make_sampler(settings, recipe.search_space, seed_offset=index)
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


class FailureGuard:
    """Stops the study when a recipe is broken rather than unlucky: the same error on two failed
    candidates in a row (it would recur), or ``limit`` failed candidates in a row of any kind.

    Errors that can pass (out of memory, a lost worker, Ctrl-C) never count as "the same"."""

    TRANSIENT = ("OutOfMemoryError", "interrupted")

    def __init__(self, limit: int, announce: bool = True):
        self.limit = limit
        self.announce = announce  # the parallel monitor announces every worker's failures itself
        self.streak = 0
        self.last_error: str | None = None
        self.repeated: tuple[int, int] | None = None  # the two trials that failed the same way
        self._last_number: int | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            self.streak, self.last_error, self._last_number = 0, None, None
            return
        error = trial.user_attrs.get("error")
        if self.announce:
            LOG.warning("trial %d failed: %s", trial.number, one_line(error or "its worker was lost"))
        if (error and error == self.last_error and self._last_number is not None
                and not error.startswith(self.TRANSIENT)):
            self.repeated = (self._last_number, trial.number)
        self.streak += 1
        self.last_error, self._last_number = error, trial.number
        if self.tripped:
            study.stop()

    @property
    def tripped(self) -> bool:
        return self.streak >= self.limit or self.repeated is not None

    def check(self, run_dir: Path) -> None:
        if not self.tripped:
            return
        folder = RunFolder(run_dir)
        where = f"tracebacks: {folder.log}; every trial: {folder.trials}."
        again = "Fix the recipe and run the same command: a recipe with the same search space resumes this run."
        error = one_line(self.last_error or "unknown").rstrip(".")
        if self.repeated is not None:
            first, second = self.repeated
            raise TooManyFailures(f"trials {first} and {second} failed with the same error, so the search stopped: "
                                  f"{error}. {where} {again}")
        raise TooManyFailures(f"{self.limit} candidates failed in a row; the last error was: {error}. {where} {again}")


def one_line(text: str) -> str:
    """The first line of an error message (a console line stays one line)."""
    return text.strip().splitlines()[0] if text.strip() else text


def search_progress(show_progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), disable=not show_progress, transient=False,
    )


class CtrlC:
    """A Ctrl-C during a search, kept until the search has seen it.

    Python raises KeyboardInterrupt in whatever the main thread runs at that moment; inside a
    finalizer the garbage collector runs (a ``__del__``, a weakref callback) it is printed as
    "Exception ignored" and dropped, and a search went on to its budget (seen once in a test run of
    a thousand short trials). So the press is also remembered, and raised again after the trial; the
    dropped one is not printed (its traceback would break the one line a Ctrl-C prints)."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None
        self.unraisable: Any = None

    def __enter__(self) -> CtrlC:
        # only the main thread can set a handler; a process started with SIGINT ignored (a background
        # job of a script) keeps ignoring it, as Python leaves it
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self._press)
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self._dropped
        return self

    def _press(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def _dropped(self, unraisable: Any) -> None:
        if self.pressed and isinstance(unraisable.exc_value, KeyboardInterrupt):
            LOG.debug("a Ctrl-C landed in a finalizer (%r); the search stops after this trial", unraisable.object)
            return
        self.unraisable(unraisable)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            sys.unraisablehook = self.unraisable

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:  # an Optuna callback, after each trial
        if self.pressed:
            raise KeyboardInterrupt


def optimize_until(
    study: optuna.Study, objective: Callable[[optuna.Trial], Any], trials: int, guard: FailureGuard,
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
            with CtrlC() as ctrl_c:
                study.optimize(
                    objective,
                    n_trials=trials - counted(study),
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                    catch=(Exception,),
                    callbacks=[ctrl_c, reached, *callbacks, guard],
                )
        except BaseException as e:
            lost = lost_storage(e) if isinstance(e, Exception) else None
            if lost is not None:
                raise lost from None
            if interrupted(e):
                _fail_in_flight(study, e)
                raise KeyboardInterrupt from None
            raise


def _fail_in_flight(study: optuna.Study, error: BaseException) -> None:
    """The trials the interrupt escaped Optuna with, failed as interrupted rather than left RUNNING."""
    storage = storage_of(study)
    for tid in trials_in_flight(error):
        try:
            trial = storage.get_trial(tid)
        except KeyError:  # interrupted while the storage created it: rolled back, never stored
            continue
        if trial.state != TrialState.RUNNING:
            continue
        try:
            storage.set_trial_user_attr(tid, "error", "interrupted")
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except UpdateFinishedTrialError:  # finished after all (CI once saw it read RUNNING here): left as it is
            continue


def run_search(
    recipe: Recipe, run_dir: Path, worker: Worker, trials: int, show_progress: bool = True, timeout: float | None = None
) -> optuna.Study:
    """Run until the study holds ``trials`` completed trials; an interrupted run resumes here."""
    study = open_study(recipe, run_dir)
    fail_orphans(study, recipe.evolve.heartbeat_grace)
    worker.use_store(run_dir)
    export_records(run_dir, study)
    worker.remember(study)
    done = counted(study)
    if done:
        LOG.info("resuming study '%s': %d of %d trials already done", study.study_name, done, trials)
    guard = FailureGuard(recipe.evolve.max_failures)
    reached = Reached(trials)

    with search_progress(show_progress) as progress:
        bar = progress.add_task(best_text(study), total=trials, completed=min(done, trials))

        def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            append_record(run_dir, trial)
            write_sampler_files(study, run_dir)
            progress.update(bar, completed=min(len(reached.finished), trials),
                            description=best_text(study, reached.finished))

        optimize_until(study, tagged(worker.objective), trials, guard, [on_trial], timeout, reached)
    guard.check(run_dir)
    export_records(run_dir, study)
    write_sampler_files(study, run_dir)
    return study


def write_sampler_files(study: optuna.Study, run_dir: Path) -> None:
    """Samplers with state worth keeping in the run folder (CycleQD's archives.json) write it."""
    writer = getattr(study.sampler, "write_run_files", None)
    if writer is not None:
        writer(run_dir, study)


def best_text(study: optuna.Study, finished: list[FrozenTrial] | None = None) -> str:
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
