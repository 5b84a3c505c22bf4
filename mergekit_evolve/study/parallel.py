"""Several workers as local processes (``--workers N``): the parent is worker 0 (its Worker also
scores the final report) and starts ``N - 1`` spawned processes on the shared study."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

import optuna
import torch
from mergekit.options import MergeOptions

from mergekit_evolve.study.jobs import (
    POLL_SECONDS,
    Monitor,
    WorkerJob,
    WorkerPlan,
    build_worker,
    last_failures,
    stop_when,
    work,
)
from mergekit_evolve.study.search import FailureGuard, optimize_until
from mergekit_evolve.study.storage import StorageLost, reap, tagged, worker_name
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
FAILURES_EXIT = 3  # a child's exit code when its own failure guard stopped it


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


def run_local(plan: WorkerPlan, job: WorkerJob, worker: Worker, study: optuna.Study,
              monitor: Monitor) -> FailureGuard | None:
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
    LOG.info("%d workers: this process and %s; waiting for them to load", plan.count,
             ", ".join(str(p.pid) for p in children))
    # all start together, so each worker's share (and a throughput measurement) does not depend on start-up time
    while not all(r.is_set() or p.exitcode is not None for r, p in zip(ready, children, strict=False)):
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
                    reap(monitor.study, f"{socket.gethostname()}:{proc.pid}", _exit_text(proc.exitcode),
                         quiet=stop_all.is_set())
            alive = sum(p.exitcode is None for p in children) + (not parent_done.is_set())
            monitor.poll(alive)
            if not alive:
                return
            time.sleep(POLL_SECONDS)

    watcher = threading.Thread(target=watch, name="mergekit-evolve-monitor", daemon=True)
    watcher.start()
    guard = FailureGuard(job.recipe.evolve.max_failures, announce=False)  # the monitor announces failures
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
