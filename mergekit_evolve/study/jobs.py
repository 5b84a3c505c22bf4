"""What every kind of worker shares: the plan, the job a worker runs, and the parent's monitor.

This is Optuna's pattern for parallel search, not a scheduler of our own: every worker opens
the shared study storage, builds its own :class:`Worker` (resident sources and model, lm-eval
tasks) and calls ``study.optimize`` on it; the storage hands out the trials and the sampler
reads every worker's results from it. A monitor in the parent polls the storage: it appends
finished trials to ``trials.jsonl``, draws the progress bar, and when a worker dies it fails
that worker's running trial and re-queues its point once, at once rather than after the
heartbeat grace period (the heartbeat still covers workers nobody watches: other hosts, a
killed parent). ``study.parallel`` runs workers as local processes, ``study.ray_actors`` as Ray
actors; the pipeline chooses which.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mergekit.options import MergeOptions
from optuna.trial import FrozenTrial, TrialState
from rich.progress import Progress, TaskID

from mergekit_evolve.compat.optuna import storage_of
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.samplers.registry import make_sampler
from mergekit_evolve.study.records import append_record, export_records
from mergekit_evolve.study.search import (
    COUNTED,
    FailureGuard,
    best_text,
    counted,
    one_line,
    open_study,
    optimize_until,
    search_progress,
    write_sampler_files,
)
from mergekit_evolve.study.storage import fail_orphans, tagged
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
POLL_SECONDS = 0.5
# runs the workers of a plan until they stop; returns the guard that stopped them, if one did
Runner = Callable[["WorkerPlan", "WorkerJob", Worker, optuna.Study, "Monitor"], "FailureGuard | None"]


class ParallelError(RuntimeError):
    pass


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    ray: str | None = None  # "auto" or a cluster address

    @property
    def parallel(self) -> bool:
        return self.count > 1 or self.ray is not None


def plan_workers(settings: EvolveSettings, ray: str | None) -> WorkerPlan:
    """``evolve.workers`` (or ``--workers``), as processes or with ``--ray`` as actors; checked before the run
    folder is touched."""
    if ray is not None and importlib.util.find_spec("ray") is None:
        raise ParallelError("--ray needs Ray: pip install 'mergekit-evolve[ray]'")
    return WorkerPlan(settings.workers, ray)


@dataclass
class WorkerJob:
    """Everything one worker needs; pickled to a spawned process or a Ray actor."""

    recipe: Recipe
    run_dir: Path
    options: MergeOptions
    allow_pickle: bool
    trials: int
    timeout: float | None = None
    threads: int | None = None  # torch threads, so N workers on one machine do not oversubscribe its cores

    @classmethod
    def for_run(cls, recipe: Recipe, run_dir: Path, options: MergeOptions, allow_pickle: bool, trials: int,
                timeout: float | None = None) -> WorkerJob:
        # absolute paths: a Ray actor does not start in this working directory
        recipe = dataclasses.replace(recipe, path=recipe.path.resolve())
        return cls(recipe, run_dir.resolve(), options, allow_pickle, trials, timeout)


def build_worker(job: WorkerJob) -> Worker:
    register_plugins()  # mergekit knows this package's merge methods only in processes that import them
    if job.threads:
        torch.set_num_threads(job.threads)
    return Worker(job.recipe, job.options, allow_pickle=job.allow_pickle)


def work(job: WorkerJob, worker: Worker, stop: Callable[[], bool] = lambda: False,
         ready: Callable[[], object] = lambda: None) -> bool:
    """One worker's share of the search: optimize the shared study until it holds ``job.trials``
    counted trials. Returns False when this worker's failure guard stopped it."""
    study = open_study(job.recipe, job.run_dir)
    if job.run_dir.is_dir():  # a Ray actor on another host has no run folder: it keeps its examples in memory
        worker.use_store(job.run_dir)
    worker.remember(study)
    ready()
    guard = FailureGuard(job.recipe.evolve.max_failures, announce=False)  # the parent's monitor announces failures
    optimize_until(study, tagged(worker.objective), job.trials, guard, [stop_when(stop)], job.timeout)
    return not guard.tripped


def stop_when(stop: Callable[[], bool]) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if stop():
            study.stop()

    return callback


class Monitor:
    """The parent's view of the shared study: trials.jsonl, the progress bar, the live workers."""

    def __init__(self, recipe: Recipe, study: optuna.Study, run_dir: Path, trials: int, progress: Progress):
        # its own Study and sampler: the worker in this process samples from the other one meanwhile
        self.study = optuna.load_study(study_name=study.study_name, storage=storage_of(study),
                                       sampler=make_sampler(recipe.evolve, recipe.search_space))
        self.run_dir, self.trials, self.progress = run_dir, trials, progress
        self.recorded = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.bar: TaskID = progress.add_task(best_text(study), total=trials, completed=min(counted(study), trials))

    def poll(self, alive: int) -> None:
        trials = self.study.get_trials(deepcopy=False)  # one read of the storage for everything below
        new = [t for t in trials if t.state.is_finished() and t.number not in self.recorded]
        for trial in sorted(new, key=lambda t: t.number):
            append_record(self.run_dir, trial)
            self.recorded.add(trial.number)
            if trial.state == TrialState.FAIL and trial.user_attrs.get("error"):
                LOG.warning("trial %d failed: %s", trial.number, one_line(trial.user_attrs["error"]))
        if new:
            write_sampler_files(self.study, self.run_dir)
        done = [t for t in trials if t.state in COUNTED]
        self.progress.update(self.bar, completed=min(len(done), self.trials),
                             description=f"{best_text(self.study, done)}, {alive} workers")


def run_parallel(
    plan: WorkerPlan, recipe: Recipe, run_dir: Path, worker: Worker, job: WorkerJob, runner: Runner,
    show_progress: bool = True,
) -> optuna.Study:
    """Run the search with ``plan``'s workers through ``runner``; returns the study once they have all stopped."""
    study = open_study(recipe, run_dir)
    fail_orphans(study, recipe.evolve.heartbeat_grace)
    export_records(run_dir, study)
    if counted(study):
        LOG.info("resuming study '%s': %d of %d trials already done", study.study_name, counted(study), job.trials)
    with search_progress(show_progress) as progress:
        monitor = Monitor(recipe, study, run_dir, job.trials, progress)
        tripped = runner(plan, job, worker, study, monitor)
    export_records(run_dir, study)
    write_sampler_files(study, run_dir)
    if tripped is not None:
        tripped.check(run_dir)
    return study


def last_failures(study: optuna.Study, limit: int) -> FailureGuard:
    """A guard filled with the study's latest failures, to report why another worker gave up."""
    guard = FailureGuard(limit, announce=False)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[-limit:]
    for trial in failed:
        guard.streak += 1
        guard.last_error = trial.user_attrs.get("error") or guard.last_error
    errors = [t.user_attrs.get("error") for t in failed[-2:]]
    if len(errors) == 2 and errors[0] and errors[0] == errors[1] and not errors[0].startswith(FailureGuard.TRANSIENT):
        guard.repeated = (failed[-2].number, failed[-1].number)
    return guard


