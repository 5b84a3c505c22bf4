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
number of finished trials). Optuna's full CMA-ES resamples a candidate that leaves the box up to
10 x dims times, each an O(dims^2) product, so its cost climbs once the search nears the bounds
(``--objective open`` drives it there, ``random`` does not); separable CMA-ES (``sepcma``,
``CmaEsSampler(use_separable_cma=True)``) samples in O(dims).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path

import click
import optuna
from optuna.distributions import FloatDistribution
from threadpoolctl import threadpool_limits

SAMPLERS = {
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
    "sepcma": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, use_separable_cma=True),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
}
# "open" rewards open slots, so the search runs into the box's bounds as a real one can;
# "random" keeps the search near the middle of the box.
OBJECTIVES = {
    "open": lambda params, rng: sum(v > 0 for v in params.values()) / len(params),
    "random": lambda params, rng: rng.random(),
}


def seconds_per_trial(sampler: str, dims: int, trials: int, storage: str | None, objective: str) -> tuple[float, float]:
    distributions = {f"routing.slot{i:03d}": FloatDistribution(-1.0, 1.0) for i in range(dims)}
    study = optuna.create_study(sampler=SAMPLERS[sampler](0), storage=storage, direction="maximize")
    rng = random.Random(0)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(distributions)
        study.tell(trial, OBJECTIVES[objective](trial.params, rng))
        times.append(time.perf_counter() - t0)
    tail = times[-max(1, trials // 4):]
    return sum(times) / len(times), sum(tail) / len(tail)


@click.command()
@click.option("--dims", default="10,100,400", help="comma-separated dimension counts")
@click.option("--trials", default=200, help="trials per sampler and dimension count")
@click.option("--samplers", default="cmaes,sepcma,tpe", help=f"comma-separated, of {', '.join(SAMPLERS)}")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default="open", help="the dummy objective")
@click.option("--storage", type=click.Choice(["memory", "sqlite"]), default="memory")
@click.option("--blas-threads", type=int, default=None, help="limit numpy's BLAS threads (default: its own choice)")
def main(dims: str, trials: int, samplers: str, objective: str, storage: str, blas_threads: int | None) -> None:
    optuna.logging.set_verbosity(logging.WARNING)
    click.echo(f"{'sampler':8} {'dims':>5} {'trials':>6} {'s/trial (all)':>14} {'s/trial (last 25%)':>19}   "
               f"objective={objective} storage={storage} blas_threads={blas_threads or 'default'}")
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=blas_threads, user_api="blas"):
        for name in samplers.split(","):
            for d in map(int, dims.split(",")):
                url = f"sqlite:///{Path(tmp) / f'{name}-{d}.db'}" if storage == "sqlite" else None
                mean, tail = seconds_per_trial(name, d, trials, url, objective)
                click.echo(f"{name:8} {d:5d} {trials:6d} {mean:14.4f} {tail:19.4f}")


if __name__ == "__main__":
    main()
