"""Trial throughput of the search with 1 and 2 worker processes, measured side by side in one run.

    python bench/workers.py [--trials 24]

Runs `mergekit-evolve RECIPE --workers N` on the demo recipe (recipes/demo.yml), or on tiny
Llama models with a 96-example copy task while the demo's models are not built, each in a fresh run
folder: 1 worker with torch's default threads (one per core), 1 worker with one thread, and
2 workers (which split the cores: one thread each on 2 cores). Throughput is finished trials
(completed or pruned)
per second between the first trial's start and the last one's end, read from the study (the
workers start searching together, once all are loaded); the command's wall time, start-up and
report included, is printed beside it, and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_parallel import write_recipe  # noqa: E402
from tiny_models import make_family, write_copy_task  # noqa: E402


def bench_recipe(folder: Path) -> tuple[Path, str]:
    demo = REPO / "recipes" / "demo.yml"
    if demo.exists() and (REPO / "recipes" / "demo" / "models").is_dir():
        return demo, "recipes/demo.yml"
    write_copy_task(folder, n_search=96)
    recipe = write_recipe(folder, make_family(folder / "llama", "llama"), "tiny", trials=1)
    return recipe, "tiny llama (the demo's models are not built yet)"


def measure(recipe: Path, run_dir: Path, workers: int, trials: int, env: dict[str, str]) -> tuple[int, float, float]:
    """(finished trials, completed or pruned; trials per second while searching; wall seconds of the whole command)."""
    cmd = [sys.executable, "-m", "mergekit_evolve", str(recipe), "-o", str(run_dir), "--workers", str(workers),
           "--trials", str(trials), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    wall = time.perf_counter() - t0
    name = optuna.get_all_study_names(f"sqlite:///{run_dir / 'study.db'}")[0]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done), len(done) / span, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    rows = [("1 worker, default threads", 1, {}), ("1 worker, 1 thread", 1, {"OMP_NUM_THREADS": "1"}), ("2 workers", 2, {})]
    with tempfile.TemporaryDirectory() as tmp:
        recipe, label = bench_recipe(Path(tmp))
        print(f"recipe: {label}; {args.trials} trials; {os.cpu_count()} CPU cores; "
              f"load average before: {os.getloadavg()[0]:.1f}")
        print(f"{'':<26}  {'trials':>6}  {'trials/s':>8}  {'vs first':>8}  {'wall s':>7}")
        first = None
        for i, (name, n, env) in enumerate(rows):
            count, rate, wall = measure(recipe, Path(tmp) / f"run{i}", n, args.trials, env)
            first = first or rate
            print(f"{name:<26}  {count:>6}  {rate:>8.3f}  {rate / first:>7.2f}x  {wall:>7.1f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
