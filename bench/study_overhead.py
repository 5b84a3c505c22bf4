"""Per-trial cost of the study machinery alone: the demo's search loop with the merge and the
evaluation taken out.

    python bench/study_overhead.py [--trials 60] [--repeat 3] [--profile] [--storage journal]

Runs ``run_search`` on recipes/demo.yml (CMA-ES, popsize 6, SQLite study.db in a fresh run
folder, the same callbacks, trials.jsonl records and heartbeats as a real run) with the real
``Worker.objective``, except that materialising the model and scoring it are replaced by a
no-op returning scores derived from the point. What is left per trial is Optuna (storage,
sampler, callbacks), the objective's own bookkeeping (suggest, compile, user attrs) and the
records. Printed: milliseconds per trial (best of ``--repeat`` runs), and for reference the
same CMA-ES sampler asked and told through in-memory storage (the sampler's own cost).
``--storage journal`` keeps the study in a journal file in the run folder instead of study.db.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import tempfile
import time
import uuid
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402

import mergekit_evolve.study.worker as worker_module  # noqa: E402
from mergekit_evolve.evaluate.scores import Scores  # noqa: E402
from mergekit_evolve.recipe.document import load_recipe  # noqa: E402
from mergekit_evolve.recipe.parse import Recipe  # noqa: E402
from mergekit_evolve.samplers.registry import make_sampler  # noqa: E402
from mergekit_evolve.study.search import run_search  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def no_op_worker(recipe: Recipe) -> Worker:
    """The demo's Worker whose merge and scoring cost nothing (a smooth function of the point)."""
    worker = Worker(recipe, merge_options(recipe))
    worker.merger.materialize = lambda config: config

    def scores(settings, evaluator, anchors, config, digest: str, trial: optuna.Trial) -> Scores:
        weights = [m.parameters["weight"] for m in config.models]
        return Scores({o.name: 1.0 - abs(wt - 0.5) for o, wt in zip(recipe.evolve.objectives, weights, strict=False)})

    worker_module.staged_scores = scores  # the name Worker.objective calls
    return worker


# counted over every SQLAlchemy engine (a transaction: any session commit, reads too); unlike
# the timings, the machine's load does not change them
SQL = {"statements": 0, "transactions": 0}


@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def _statement(*args) -> None:
    SQL["statements"] += 1


@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "commit")
def _commit(*args) -> None:
    SQL["transactions"] += 1


def loop_ms(recipe: Recipe, worker: Worker, trials: int, profile: bool,
            storage: str) -> tuple[float, float, dict[str, float]]:
    """Wall-clock and CPU milliseconds per trial (CPU time does not count other processes' load), SQL per trial."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        if storage != "sqlite":  # a journal file, or any URL (bench/workers.py --long: PostgreSQL): a study of its own
            url = f"journal:{run_dir / 'study.journal'}" if storage == "journal" else storage
            evolve = recipe.evolve.model_copy(update={"storage": url, "study_name": f"overhead-{uuid.uuid4().hex[:8]}"})
            recipe = dataclasses.replace(recipe, evolve=evolve)
        run_search(recipe, run_dir, worker, 2, show_progress=False)  # creates study.db, warms the imports
        worker.known.clear()
        profiler = cProfile.Profile() if profile else None
        SQL.update(statements=0, transactions=0)
        t, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        run_search(recipe, run_dir, worker, 2 + trials, show_progress=False)
        if profiler:
            profiler.disable()
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    return 1000 * seconds / trials, 1000 * cpu_seconds / trials, {k: v / trials for k, v in SQL.items()}


def sampler_ms(recipe: Recipe, trials: int) -> float:
    study = optuna.create_study(sampler=make_sampler(recipe.evolve, recipe.search_space), direction="maximize")
    distributions = recipe.search_space.distributions()
    t = time.perf_counter()
    for _ in range(trials):
        trial = study.ask(distributions)
        study.tell(trial, -sum(abs(v - 0.5) for v in trial.params.values()))
    return 1000 * (time.perf_counter() - t) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    parser.add_argument("--storage", choices=["sqlite", "journal"], default="sqlite",
                        help="study.db (default) or a journal file")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
    recipe = load_recipe(REPO / "recipes" / "demo.yml")
    worker = no_op_worker(recipe)
    runs = [loop_ms(recipe, worker, args.trials, args.profile and i == 0, args.storage) for i in range(args.repeat)]
    sampler = min(sampler_ms(recipe, args.trials) for _ in range(args.repeat))
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    sql = runs[0][2]
    print(f"study machinery ({args.storage}), {args.trials} demo trials (merge + evaluation removed), "
          f"best of {args.repeat}: {wall:.1f} ms/trial wall clock, {cpu:.1f} ms/trial CPU, "
          f"{sql['statements']:.1f} SQL statements and {sql['transactions']:.1f} transactions a trial "
          f"(wall clock of each run: {', '.join(f'{r[0]:.1f}' for r in runs)})")
    print(f"of which the sampler alone would be, on in-memory storage: {sampler:.1f} ms/trial")


if __name__ == "__main__":
    main()
