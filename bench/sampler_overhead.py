"""How much time an Optuna sampler itself spends per trial as the search space grows.

A DFS recipe has M x r indicator dimensions plus as many scales (two 32-layer models, r = 3:
384), so the sampler's own cost must stay small next to a merge and an evaluation. This times
``study.ask`` + ``study.tell`` with a dummy objective (no merge, no model), for CMA-ES and TPE,
at 10, 100 and 400 float dimensions in [-1, 1]:

    python bench/sampler_overhead.py                     # in-memory storage: the sampler alone
    python bench/sampler_overhead.py --storage sqlite    # as a run stores it (study.db)
    python bench/sampler_overhead.py --blas-threads 1    # numpy's BLAS on one thread

CMA-ES re-decomposes its covariance matrix (numpy ``eigh``) on every ask; on a loaded machine
multi-threaded OpenBLAS can make that call 100x slower than on one thread, hence --blas-threads.

Printed: seconds per trial over all trials and over the last quarter (TPE's cost grows with the
number of finished trials; CMA-ES's with the dimension).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import click
import optuna
from threadpoolctl import threadpool_limits
from optuna.distributions import FloatDistribution

SAMPLERS = {
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
}


def seconds_per_trial(sampler: str, dims: int, trials: int, storage: str | None) -> tuple[float, float]:
    distributions = {f"routing.slot{i:03d}": FloatDistribution(-1.0, 1.0) for i in range(dims)}
    study = optuna.create_study(sampler=SAMPLERS[sampler](0), storage=storage, direction="maximize")
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(distributions)
        value = sum(v > 0 for v in trial.params.values()) / dims  # dummy: the fraction of open slots
        study.tell(trial, value)
        times.append(time.perf_counter() - t0)
    tail = times[-max(1, trials // 4):]
    return sum(times) / len(times), sum(tail) / len(tail)


@click.command()
@click.option("--dims", default="10,100,400", help="comma-separated dimension counts")
@click.option("--trials", default=200, help="trials per sampler and dimension count")
@click.option("--samplers", default="cmaes,tpe")
@click.option("--storage", type=click.Choice(["memory", "sqlite"]), default="memory")
@click.option("--blas-threads", type=int, default=None, help="limit numpy's BLAS threads (default: its own choice)")
def main(dims: str, trials: int, samplers: str, storage: str, blas_threads: int | None) -> None:
    optuna.logging.set_verbosity(logging.WARNING)
    click.echo(f"{'sampler':8} {'dims':>5} {'trials':>6} {'s/trial (all)':>14} {'s/trial (last 25%)':>19}   "
               f"storage={storage} blas_threads={blas_threads or 'default'}")
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=blas_threads, user_api="blas"):
        for name in samplers.split(","):
            for d in map(int, dims.split(",")):
                url = f"sqlite:///{Path(tmp) / f'{name}-{d}.db'}" if storage == "sqlite" else None
                mean, tail = seconds_per_trial(name, d, trials, url)
                click.echo(f"{name:8} {d:5d} {trials:6d} {mean:14.4f} {tail:19.4f}")


if __name__ == "__main__":
    main()
