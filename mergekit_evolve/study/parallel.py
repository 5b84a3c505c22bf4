"""Several workers fed by one study: local processes (``--workers N``) or Ray actors (``--ray``).

This is Optuna's pattern for parallel search, not a scheduler of our own: every worker opens
the shared study storage, builds its own :class:`Worker` (resident sources and model, lm-eval
tasks) and calls ``study.optimize`` on it; the storage hands out the trials and the sampler
reads every worker's results from it. Locally the parent is worker 0 (its Worker also scores
the final report) and starts ``N - 1`` spawned processes. A monitor in the parent polls the
storage: it appends finished trials to ``trials.jsonl``, draws the progress bar, and when a
worker dies it fails that worker's running trial and re-queues its point once, at once rather
than after the heartbeat grace period (the heartbeat still covers workers nobody watches:
other hosts, a killed parent).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mergekit.options import MergeOptions
from optuna.trial import FrozenTrial, TrialState
from rich.progress import Progress, TaskID

from mergekit_evolve.plugins import register_plugins
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.load import Recipe
from mergekit_evolve.sampler.factory import make_sampler
from mergekit_evolve.study.records import append_record, export_records
from mergekit_evolve.study.search import (
    COUNTED, _best_text, _FailureGuard, _write_sampler_files, counted, open_study, optimize_until, search_progress,
)
from mergekit_evolve.study.storage import WORKER_KEY, RetryLost, StorageLost, tagged, worker_name
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
FAILURES_EXIT = 3  # a child's exit code when its own failure guard stopped it
POLL_SECONDS = 0.5


class ParallelError(RuntimeError):
    pass


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    ray: str | None = None  # "auto" or a cluster address

    @property
    def parallel(self) -> bool:
        return self.count > 1 or self.ray is not None


def plan_workers(settings: EvolveSettings, workers: int | None, ray: str | None) -> WorkerPlan:
    """``--workers``/``--ray`` over ``evolve.workers``; checked before the run folder is touched."""
    if ray is not None and importlib.util.find_spec("ray") is None:
        raise ParallelError("--ray needs Ray: pip install 'mergekit-evolve[ray]'")
    return WorkerPlan(workers or settings.workers, ray)


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
                timeout: float | None = None) -> "WorkerJob":
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
    guard = _FailureGuard(job.recipe.evolve.max_failures)
    optimize_until(study, tagged(worker.objective), job.trials, guard, [stop_when(stop)], job.timeout)
    return not guard.tripped


def stop_when(stop: Callable[[], bool]) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if stop():
            study.stop()

    return callback


def reap(study: optuna.Study, name: str, why: str, quiet: bool = False) -> list[int]:
    """Fail the running trials of the dead worker ``name`` and re-queue each point once.

    ``why`` ends "worker NAME ..." in the warning; ``quiet`` logs nothing (a stop we asked for)."""
    retry = RetryLost(max_retry=1)
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_KEY) != name:
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        retry(study, trial)  # uses only its point and attrs
        lost.append(trial.number)
    if not quiet:
        requeued = f"; its trial {', '.join(map(str, lost))} failed and was re-queued" if lost else ""
        LOG.warning("worker %s %s%s", name, why, requeued)
    return lost


class Monitor:
    """The parent's view of the shared study: trials.jsonl, the progress bar, the live workers."""

    def __init__(self, recipe: Recipe, study: optuna.Study, run_dir: Path, trials: int, progress: Progress):
        # its own Study and sampler: the worker in this process samples from the other one meanwhile
        self.study = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                       sampler=make_sampler(recipe.evolve, recipe.space))
        self.run_dir, self.trials, self.progress = run_dir, trials, progress
        self.recorded = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.bar: TaskID = progress.add_task(_best_text(study), total=trials, completed=min(counted(study), trials))

    def poll(self, alive: int) -> None:
        trials = self.study.get_trials(deepcopy=False)  # one read of the storage for everything below
        new = [t for t in trials if t.state.is_finished() and t.number not in self.recorded]
        for trial in sorted(new, key=lambda t: t.number):
            append_record(self.run_dir, trial)
            self.recorded.add(trial.number)
            if trial.state == TrialState.FAIL and trial.user_attrs.get("error"):
                LOG.warning("trial %d failed: %s", trial.number, trial.user_attrs["error"])
        if new:
            _write_sampler_files(self.study, self.run_dir)
        done = [t for t in trials if t.state in COUNTED]
        self.progress.update(self.bar, completed=min(len(done), self.trials),
                             description=f"{_best_text(self.study, done)}, {alive} workers")


def run_parallel(
    plan: WorkerPlan, recipe: Recipe, run_dir: Path, worker: Worker, job: WorkerJob, show_progress: bool = True,
) -> optuna.Study:
    """Run the search with ``plan``'s workers; returns the study once they have all stopped."""
    study = open_study(recipe, run_dir)
    export_records(run_dir, study)
    if counted(study):
        LOG.info("resuming study '%s': %d of %d trials already done", study.study_name, counted(study), job.trials)
    with search_progress(show_progress) as progress:
        monitor = Monitor(recipe, study, run_dir, job.trials, progress)
        if plan.ray is not None:
            from mergekit_evolve.study.ray_workers import run_ray

            tripped = run_ray(plan, job, monitor)
        else:
            tripped = _run_local(plan, job, worker, study, monitor)
    export_records(run_dir, study)
    _write_sampler_files(study, run_dir)
    if tripped is not None:
        tripped.check(run_dir)
    return study


def last_failures(study: optuna.Study, limit: int) -> _FailureGuard:
    """A guard filled with the study's latest failures, to report why another worker gave up."""
    guard = _FailureGuard(limit)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[-limit:]:
        guard.streak += 1
        guard.last_error = trial.user_attrs.get("error") or guard.last_error
    return guard


# --- local processes ---------------------------------------------------------------------


def _child_main(job: WorkerJob, ready: threading.Event, stop_all: threading.Event, log_level: int) -> None:
    """A spawned worker process; its exit code tells the parent how it ended."""
    logging.basicConfig(level=logging.WARNING, format=f"[worker {worker_name()}] %(levelname)s %(message)s")
    logging.getLogger("mergekit_evolve").setLevel(log_level)
    optuna.logging.set_verbosity(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # the parent stops us: Optuna marks the running trial failed
    parent = multiprocessing.parent_process()
    try:
        worker = build_worker(job)
        ok = work(job, worker, lambda: stop_all.is_set() or (parent is not None and not parent.is_alive()), ready.set)
    except KeyboardInterrupt:
        sys.exit(130)
    except StorageLost as e:  # one line, as the parent says it; not a traceback per worker
        LOG.error("%s", e)
        sys.exit(1)
    sys.exit(0 if ok else FAILURES_EXIT)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _device(options: MergeOptions, index: int) -> MergeOptions:
    """Worker ``index``'s device: with several GPUs and device 'cuda', one GPU each, round robin."""
    count = torch.cuda.device_count()
    if options.device != "cuda" or count < 2:
        return options
    return options.model_copy(update={"device": f"cuda:{index % count}"})


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed ({signal.Signals(-code).name})"
    return f"stopped with exit code {code}"


def _run_local(plan: WorkerPlan, job: WorkerJob, worker: Worker, study: optuna.Study, monitor: Monitor) -> _FailureGuard | None:
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's torch/lm-eval state (and its threads)
    stop_all = ctx.Event()
    threads = job.recipe.evolve.threads or max(1, (os.cpu_count() or 1) // plan.count)
    children, ready = [], []
    for index in range(1, plan.count):
        child_job = dataclasses.replace(job, options=_device(job.options, index), threads=threads)
        ready.append(ctx.Event())
        proc = ctx.Process(target=_child_main, name=f"mergekit-evolve-worker-{index}",
                           args=(child_job, ready[-1], stop_all, logging.getLogger("mergekit_evolve").level))
        proc.start()
        children.append(proc)
    LOG.info("%d workers: this process and %s; waiting for them to load", plan.count, ", ".join(str(p.pid) for p in children))
    # all start together, so each worker's share (and a throughput measurement) does not depend on start-up time
    while not all(r.is_set() or p.exitcode is not None for r, p in zip(ready, children)):
        time.sleep(POLL_SECONDS)
    child_tripped = threading.Event()
    parent_done = threading.Event()

    def watch() -> None:
        try:
            follow()
        except StorageLost:  # the search in this process meets it too, and says so
            LOG.debug("monitor stopped: the study storage is lost", exc_info=True)

    def follow() -> None:
        handled: set[int] = set()
        while True:
            for proc in children:
                if proc.exitcode is None or proc.pid in handled:
                    continue
                handled.add(proc.pid)
                if proc.exitcode == FAILURES_EXIT:
                    child_tripped.set()
                    stop_all.set()
                elif proc.exitcode != 0:
                    reap(monitor.study, f"{socket.gethostname()}:{proc.pid}", _exit_text(proc.exitcode), quiet=stop_all.is_set())
            alive = sum(p.exitcode is None for p in children) + (not parent_done.is_set())
            monitor.poll(alive)
            if not alive:
                return
            time.sleep(POLL_SECONDS)

    watcher = threading.Thread(target=watch, name="mergekit-evolve-monitor", daemon=True)
    watcher.start()
    guard = _FailureGuard(job.recipe.evolve.max_failures)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        optimize_until(study, tagged(worker.objective), job.trials, guard,
                       [stop_when(stop_all.is_set)], job.timeout)
        if guard.tripped:
            stop_all.set()
    except BaseException:  # Ctrl-C: stop the children too; their running trials are failed by Optuna
        stop_all.set()
        for proc in children:
            proc.terminate()
        raise
    finally:
        torch.set_num_threads(before)
        parent_done.set()
        for proc in children:
            proc.join()
        watcher.join()
    if guard.tripped:
        return guard
    if child_tripped.is_set():
        return last_failures(study, job.recipe.evolve.max_failures)
    return None
