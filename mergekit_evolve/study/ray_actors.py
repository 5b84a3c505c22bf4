"""Workers as Ray actors (``--ray auto`` or ``--ray ADDRESS``): one per GPU, else N CPU actors.

Each actor is an ordinary worker (:func:`~mergekit_evolve.study.parallel.work`) on the shared
study storage, so the storage must be reachable from every node: SQLite or a journal file in
the run folder serve a single machine (or a shared file system); use PostgreSQL for a cluster.
The driver only watches: it records trials, draws progress, and fails (and re-queues) the
running trial of an actor Ray reports lost. Its own Worker, built for validation, scores the
report at the end, on the driver's ``--device``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import optuna

from mergekit_evolve.study.jobs import (
    POLL_SECONDS,
    Monitor,
    ParallelError,
    WorkerJob,
    WorkerPlan,
    build_worker,
    last_failures,
    work,
)
from mergekit_evolve.study.search import FailureGuard, counted
from mergekit_evolve.study.storage import reap, worker_name
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
# Settings of the driver's environment that actors need too (tokens are not sent: log in on each node).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM")


class SearchActor:
    """One worker in a Ray actor: built once (resident models, lm-eval tasks), then searching."""

    def __init__(self, job: WorkerJob):
        logging.basicConfig(level=logging.WARNING)
        optuna.logging.set_verbosity(logging.WARNING)
        self.job = job
        self.worker = build_worker(job)

    def name(self) -> str:
        return worker_name()

    def run(self) -> bool:
        return work(self.job, self.worker)


def plan_actors(resources: dict[str, float], requested: int) -> tuple[int, dict[str, Any]]:
    """How many actors and what each asks Ray for: a GPU each when the cluster has GPUs
    (all of them, or ``requested`` when more than one was asked for), else ``requested`` CPU actors."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (min(requested, gpus) if requested > 1 else gpus), {"num_gpus": 1}
    return requested, {"num_cpus": 1}


def run_ray(plan: WorkerPlan, job: WorkerJob, worker: Worker, study: optuna.Study,
            monitor: Monitor) -> FailureGuard | None:
    """A ``jobs.Runner``: the driver only watches (``worker`` and ``study`` are the driver's, unused here)."""
    import ray  # an optional dependency (the ray extra), imported when --ray asks for it
    from ray.exceptions import RayActorError, RayError

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    try:
        ray.init(address=None if plan.ray == "auto" else plan.ray, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ParallelError(f"cannot start or join the Ray cluster '{plan.ray}': {e}") from None
    try:
        count, resources = plan_actors(ray.cluster_resources(), plan.count)
        device = "cuda" if "num_gpus" in resources else "cpu"
        actor_job = dataclasses.replace(job, options=job.options.model_copy(update={"device": device}), threads=None)
        Actor = ray.remote(max_restarts=0)(SearchActor)
        actors = [Actor.options(**resources).remote(actor_job) for _ in range(count)]
        LOG.info("%d Ray actors (%s each)", count, ", ".join(f"{k}={v}" for k, v in resources.items()))
        known: dict[int, str] = {}
        errors: list[str] = []
        tripped = False
        try:
            # all start together once loaded, as local workers do: otherwise the first actor up
            # runs a short search alone, and a throughput measurement counts start-up times
            for i, actor in enumerate(actors):
                try:
                    known[i] = ray.get(actor.name.remote())
                except RayError as e:
                    errors.append(f"actor {i}: {e}")
            runs = {actors[i].run.remote(): i for i in known}
            while runs:
                ready, _ = ray.wait(list(runs), num_returns=len(runs), timeout=POLL_SECONDS)
                for ref in ready:
                    i = runs.pop(ref)
                    try:
                        if not ray.get(ref):
                            tripped = True
                    except RayActorError as e:
                        errors.append(f"actor {i}: {e}")
                        reap(monitor.study, known[i], "was lost (Ray actor died)")
                    except RayError as e:
                        errors.append(f"actor {i}: {e}")
                        reap(monitor.study, known[i], f"failed: {e}")
                if tripped and runs:
                    for i in runs.values():
                        ray.kill(actors[i])
                monitor.poll(len(runs))
        except BaseException:  # Ctrl-C: the actors' running trials are failed and re-queued
            for actor in actors:
                ray.kill(actor)
            for name in known.values():
                reap(monitor.study, name, "was stopped", quiet=True)
            raise
    finally:
        ray.shutdown()
    monitor.poll(0)
    if tripped:
        return last_failures(monitor.study, job.recipe.evolve.max_failures)
    if counted(monitor.study) < job.trials and errors and job.timeout is None:
        raise ParallelError(f"every Ray actor stopped before the study reached {job.trials} trials; "
                            f"first error: {errors[0]}")
    return None
