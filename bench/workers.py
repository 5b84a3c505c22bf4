"""Trial throughput of the search with 1 and 2 worker processes, measured side by side in one run.

    python bench/workers.py [--trials 24]
    python bench/workers.py --long [--examples 480] [--trials 24]

Runs `mergekit-evolve RECIPE --workers N` on the demo recipe (recipes/demo.yml), or on tiny
Llama models with a 96-example copy task while the demo's models are not built, each in a fresh run
folder: 1 worker with torch's default threads (one per core), 1 worker with one thread, and
2 workers (which split the cores: one thread each on 2 cores). Throughput is finished trials
(completed or pruned)
per second between the first trial's start and the last one's end, read from the study (the
workers start searching together, once all are loaded); the command's wall time, start-up and
report included, is printed beside it, and the load average, since the machine may be shared.

``--long``: trials of realistic length (seconds, as a real checkpoint gives). The demo with
``--examples`` search examples per skill (drawn afresh as recipes/demo/train.py draws its own: a
trial scores each; the default 480 makes a trial 2-3 s on one core), every row with one torch thread
a worker: 1 worker, 2 workers (``--workers 2``), and two separate processes, each with its
own run folder, on one SQLite file and on one PostgreSQL study (a throwaway server from
tests/pg_cluster.py, with PostgreSQL's durable defaults), as several hosts would run. Then
the storage's own cost per trial on each (bench/study_overhead.py's loop: the demo's trials
with the merge and the evaluation taken out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pg_cluster import ClusterUnavailable, PostgresCluster  # noqa: E402
from study.test_parallel import write_recipe  # noqa: E402
from tiny_models import make_family, write_copy_task  # noqa: E402

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def bench_recipe(folder: Path) -> tuple[Path, str]:
    demo = REPO / "recipes" / "demo.yml"
    if demo.exists() and (REPO / "recipes" / "demo" / "models").is_dir():
        return demo, "recipes/demo.yml"
    write_copy_task(folder, n_search=96)
    recipe = write_recipe(folder, make_family(folder / "llama", "llama"), "tiny", trials=1)
    return recipe, "tiny llama (the demo's models are not built yet)"


def long_recipe(folder: Path, examples: int) -> Path:
    """A copy of the demo whose search split has ``examples`` examples a skill (the models linked, not copied)."""
    demo = REPO / "recipes" / "demo"
    if not (demo / "models" / "base").is_dir():
        sys.exit("--long needs the demo's models: python recipes/demo/train.py")
    shutil.copytree(demo, folder / "demo", ignore=shutil.ignore_patterns("models"))
    (folder / "demo" / "models").symlink_to(demo / "models")
    sys.path.insert(0, str(demo))
    from train import SKILLS, Settings, random_text

    # new examples drawn as the demo draws its own: repeated ones would be scored once (identical requests)
    rng, cfg = random.Random(0), Settings()
    for skill in SKILLS:
        items, seen = [], set()
        while len(items) < examples:
            if (text := random_text(rng, cfg, skill)) not in seen:
                seen.add(text)
                items.append(json.dumps(skill.item(text)))
        (folder / "demo" / "data" / f"{skill.name}_search.jsonl").write_text("\n".join(items) + "\n")
    shutil.copyfile(REPO / "recipes" / "demo.yml", folder / "demo.yml")
    return folder / "demo.yml"


def command(recipe: Path, run_dir: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergekit_evolve", str(recipe), "-o", str(run_dir), "--trials", str(trials),
            "--no-progress", *extra]


def searched(url: str) -> tuple[int, float, float]:
    """(finished trials, mean seconds a trial, trials per second between the first start and the last end)."""
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    done = study.get_trials(states=FINISHED)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)
    return len(done), mean, len(done) / span


def measure(recipe: Path, run_dir: Path, workers: int, trials: int, env: dict[str, str]) -> tuple[int, float, float]:
    """(finished trials, completed or pruned; trials per second while searching; wall seconds of the whole command)."""
    t0 = time.perf_counter()
    subprocess.run(command(recipe, run_dir, trials, "--workers", str(workers)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    wall = time.perf_counter() - t0
    count, _, rate = searched(f"sqlite:///{run_dir / 'study.db'}")
    return count, rate, wall


def measure_hosts(recipe: Path, folder: Path, url: str, trials: int) -> tuple[int, float, float, float]:
    """Two processes, each with its own run folder, on the study at ``url``: as ``searched``, then wall seconds."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(command(recipe, folder / f"host-{i}", trials, "--storage", url),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    if any(p.wait() for p in procs):
        sys.exit(f"a process on {url} failed: run it by hand to see why")
    return (*searched(url), time.perf_counter() - t0)


def storage_ms(storage: str, trials: int) -> float:
    """The study machinery's milliseconds a trial on ``storage``, "sqlite" (study.db) or a URL
    (bench/study_overhead.py's loop, best of 2)."""
    import study_overhead

    from mergekit_evolve.recipe.document import load_recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.8
    recipe = load_recipe(REPO / "recipes" / "demo.yml")
    worker = study_overhead.no_op_worker(recipe)
    return min(study_overhead.loop_ms(recipe, worker, trials, False, storage)[0] for _ in range(2))


def long_trials(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = long_recipe(folder, args.examples)
        print(f"demo with {args.examples} search examples a skill; {args.trials} trials; one torch thread a worker; "
              f"{os.cpu_count()} CPU cores; load average before: {os.getloadavg()[0]:.1f}")
        print(f"{'':<36}  {'trials':>6}  {'s/trial':>7}  {'trials/s':>8}  {'vs 1':>6}  {'wall s':>7}")
        rows: list[tuple[str, int, float, float, float]] = []
        for n in (1, 2):
            run_dir = folder / f"workers{n}"
            count, rate, wall = measure(recipe, run_dir, n, args.trials, {})
            mean = searched(f"sqlite:///{run_dir / 'study.db'}")[1]
            rows.append((f"{n} worker{'s' if n > 1 else ''} (--workers {n})", count, mean, rate, wall))
            print_row(rows[-1], rows[0][3])
        sqlite = f"sqlite:///{folder / 'shared.db'}"
        rows.append(("2 processes, one SQLite file", *measure_hosts(recipe, folder / "sqlite", sqlite, args.trials)))
        print_row(rows[-1], rows[0][3])
        try:
            cluster = PostgresCluster(durable=True)
        except ClusterUnavailable as e:
            print(f"PostgreSQL rows skipped: {e}")
            return
        try:
            rows.append(("2 processes, one PostgreSQL study",
                         *measure_hosts(recipe, folder / "pg", cluster.url, args.trials)))
            print_row(rows[-1], rows[0][3])
            overhead = {"SQLite": storage_ms("sqlite", 60), "PostgreSQL": storage_ms(cluster.url, 60)}
        finally:
            cluster.remove()
        print("study machinery a trial (merge and evaluation taken out, 60 trials, best of 2): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in overhead.items()))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        print(json.dumps({"rows": rows, "storage_ms": overhead}))


def print_row(row: tuple[str, int, float, float, float], first: float) -> None:
    name, count, mean, rate, wall = row
    print(f"{name:<36}  {count:>6}  {mean:>7.2f}  {rate:>8.3f}  {rate / first:>5.2f}x  {wall:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="a row's budget (two workers finish one more: "
                        "the last ask of the other; more trials dilute that tail)")
    parser.add_argument("--long", action="store_true",
                        help="trials of seconds; also several processes on SQLite and PostgreSQL")
    parser.add_argument("--examples", type=int, default=480, help="--long: search examples a skill")
    args = parser.parse_args()
    if args.long:
        long_trials(args)
        return
    rows = [("1 worker, default threads", 1, {}), ("1 worker, 1 thread", 1, {"OMP_NUM_THREADS": "1"}),
            ("2 workers", 2, {})]
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
