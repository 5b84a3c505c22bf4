"""Full evaluation vs cheaper fitness modes at an equal wall-clock budget, on the demo.

    python bench/cheap_fitness.py [--recipe recipes/demo.yml] [--seconds 60] [--seeds 0 1 2]

For each seed and mode: trials finished (completed + pruned) per hour, counting the search's
budget plus choosing the winner (with anchors, the best estimates are re-scored on the whole
search split), examples run through the model (forward passes), and the winner's score on the
held-out split (always the whole split). All modes run in this one process, one after the other, on the same resident
models and tasks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402

from mergekit_evolve.recipe.evolve_settings import PruningSettings  # noqa: E402
from mergekit_evolve.recipe.load import load_recipe  # noqa: E402
from mergekit_evolve.report.finalists import best_of_finalists  # noqa: E402
from mergekit_evolve.report.winner import winner_config  # noqa: E402
from mergekit_evolve.study.search import run_search  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = [0.25, 0.5, 1.0]
MODES = {
    "full": {},
    "median": {"pruning": PruningSettings(pruner="median", stages=STAGES, options={"n_startup_trials": 4})},
    "successive_halving": {"pruning": PruningSettings(pruner="successive_halving", stages=STAGES)},
    "wilcoxon": {"pruning": PruningSettings(pruner="wilcoxon", stages=STAGES, options={"p_threshold": 0.1})},
    "anchors": {"anchors": 16},
    "anchors32": {"anchors": 32},
}


def configure(recipe, mode: str, seed: int):
    settings = recipe.evolve.model_copy(deep=True)
    settings.seed = seed
    settings.pruning = MODES[mode].get("pruning", PruningSettings(pruner="none"))
    for obj in settings.objectives:
        obj.anchors = MODES[mode].get("anchors")
    recipe.evolve = settings
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yml"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    recipe = load_recipe(args.recipe)
    worker = Worker(recipe, merge_options(recipe, "cpu"))
    rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.modes}
    for seed in args.seeds:
        for mode in args.modes:
            worker.recipe = configure(load_recipe(args.recipe), mode, seed)
            worker.suite.settings = worker.recipe.evolve  # same tasks; the objectives' anchors differ
            worker.anchors, worker.known = None, {}
            with tempfile.TemporaryDirectory() as tmp:
                before = worker.evaluator.computed
                start = time.perf_counter()
                study = run_search(worker.recipe, Path(tmp), worker, trials=10_000, show_progress=False, timeout=args.seconds)
                best = best_of_finalists(study, worker)  # as the pipeline picks the winner (re-scores estimates)
                seconds = time.perf_counter() - start
                passes = worker.evaluator.computed - before
                finished = len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")])
                failed = len([t for t in study.trials if t.state.name == "FAIL"])
                heldout = worker.score_config(winner_config(best), "heldout").weighted(worker.objectives)
            rows[mode].append((finished * 3600 / seconds, passes / max(1, finished), heldout))
            print(f"seed {seed} {mode:<18} trials {finished:4d} (failed {failed}) in {seconds:5.1f} s  forward passes {passes:6d}  "
                  f"winner held-out {heldout:.4f}", flush=True)

    full_rate = statistics.mean(r[0] for r in rows["full"]) if "full" in rows else None
    print(f"\n== {args.seconds:.0f} s of search a run (+ choosing the winner), seeds {args.seeds}, "
          f"recipe {Path(args.recipe).name} (means over seeds) ==")
    print("| mode | trials/hour | vs full | forward passes per trial | winner held-out |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in rows.items():
        rate = statistics.mean(x[0] for x in r)
        per_trial = statistics.mean(x[1] for x in r)
        held = statistics.mean(x[2] for x in r)
        ratio = f"{rate / full_rate:.2f}x" if full_rate else "-"
        print(f"| {mode} | {rate:.0f} | {ratio} | {per_trial:.0f} | {held:.4f} |")


if __name__ == "__main__":
    main()
