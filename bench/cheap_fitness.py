"""Full evaluation vs cheaper fitness modes at an equal budget (wall-clock, or CPU with --clock cpu), on the demo.

    python bench/cheap_fitness.py [--recipe recipes/demo.yml] [--seconds 60] [--seeds 0 1 2] [--modes ...] [--clock cpu]

For each seed and mode: trials per hour, counting the search's budget plus choosing the winner
(with anchor estimates, the best ones are re-scored on the whole search split); examples run
through the model (forward passes) per trial; and the winner's score on the held-out split
(always the whole split), also as its difference from full evaluation's winner on the same seed.
A trial counts when it did work: completed or pruned, and not a config the search proposed
again (``reused_from``: its stored value is returned, nothing runs). All modes run in this one
process, one after the other, on the same resident models and tasks, each starting with no stored
examples (``Worker.use_recipe``), as a fresh run does.

``--clock cpu`` measures the budget (and the hour) in this process's CPU seconds instead of
wall-clock seconds: on a machine whose cores are shared with other work, a wall-clock budget
buys a different amount of computation from one run to the next. Alone on the machine, with
the demo's one torch thread, the two clocks run nearly alike.

Modes ``anchors_*`` other than ``anchors``/``anchors32`` use anchors as the pruner's first rung:
a candidate whose anchor estimate the pruner stops costs the anchors; one that survives is
scored on the whole split (its anchor examples reused), so every completed value is a full score.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

import mergekit_evolve.study.search as search_module  # noqa: E402
from mergekit_evolve.recipe.document import load_recipe  # noqa: E402
from mergekit_evolve.recipe.evolve_settings import PruningSettings  # noqa: E402
from mergekit_evolve.report.finalists import best_of_finalists  # noqa: E402
from mergekit_evolve.report.winner import winner_config  # noqa: E402
from mergekit_evolve.study.search import run_search  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = [0.25, 0.5, 1.0]
SH = PruningSettings(pruner="successive_halving", stages=[1.0])
# keeps the top quarter
PCT25 = PruningSettings(pruner="percentile", stages=[1.0], options={"percentile": 25, "n_startup_trials": 4})
MODES = {
    "full": {},
    "median": {"pruning": PruningSettings(pruner="median", stages=STAGES, options={"n_startup_trials": 4})},
    "successive_halving": {"pruning": PruningSettings(pruner="successive_halving", stages=STAGES)},
    "wilcoxon": {"pruning": PruningSettings(pruner="wilcoxon", stages=STAGES, options={"p_threshold": 0.1})},
    "anchors": {"anchors": 16},
    "anchors32": {"anchors": 32},
    # anchors as the first rung, then the whole split
    "anchors_sh": {"anchors": 16, "pruning": SH},
    "anchors32_sh": {"anchors": 32, "pruning": SH},
    "anchors_sh_rf6": {"anchors": 16, "pruning": SH.model_copy(update={"options": {"reduction_factor": 6}})},
    "anchors_sh_pruned": {"anchors": 16, "pruning": SH, "sampler_options": {"consider_pruned_trials": True}},
    # against the completed trials' anchor estimates (a bar that rises with the search), not all trials'
    "anchors_median": {
        "anchors": 16, "pruning": PruningSettings(pruner="median", stages=[1.0], options={"n_startup_trials": 4}),
    },
    "anchors_pct25": {"anchors": 16, "pruning": PCT25},
    # what a recipe gets from `anchors: 16` and the default pruner (auto)
    "anchors_auto": {"anchors": 16, "pruning": PruningSettings()},
    "anchors_pct25_pruned": {"anchors": 16, "pruning": PCT25, "sampler_options": {"consider_pruned_trials": True}},
    # anchors, half the split, the whole split: halving at each rung
    "anchors_sh_half": {
        "anchors": 16, "pruning": PruningSettings(pruner="successive_halving", stages=[0.5, 1.0],
                                                  options={"reduction_factor": 2}),
    },
}


def configure(recipe, mode: str, seed: int):
    """The recipe with the mode's settings, validated as a recipe's YAML is: only what the recipe
    and the mode set counts as set, so an auto pruner resolves exactly as for a user."""
    spec = MODES[mode]
    settings = recipe.evolve.model_dump(exclude_unset=True)
    settings["seed"] = seed
    settings["pruning"] = spec.get("pruning", PruningSettings(pruner="none")).model_dump(exclude_unset=True)
    settings["sampler_options"] = {**recipe.evolve.sampler_options.given(), **spec.get("sampler_options", {})}
    settings["objectives"] = [{**o, "anchors": spec.get("anchors")} for o in settings["objectives"]]
    recipe.evolve = type(recipe.evolve).model_validate(settings)
    return recipe


def worked(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state.name in ("COMPLETE", "PRUNED") and trial.user_attrs.get("reused_from") is None


CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


def use_clock(name: str) -> None:
    """The search loop reads its deadline off ``time.monotonic``; a CPU clock there makes the budget CPU seconds."""
    search_module.time = types.SimpleNamespace(monotonic=CLOCKS[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yml"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what the budget and trials/hour count")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    use_clock(args.clock)
    clock = CLOCKS[args.clock]

    recipe = load_recipe(args.recipe)
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)  # as the CLI does (two threads on a shared core mostly wait)
    worker = Worker(recipe, merge_options(recipe))
    rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.modes}
    for seed in args.seeds:
        for mode in args.modes:
            worker.use_recipe(configure(load_recipe(args.recipe), mode, seed))  # same tasks; the anchors differ
            with tempfile.TemporaryDirectory() as tmp:
                before = worker.evaluator.computed
                start = clock()
                study = run_search(worker.recipe, Path(tmp), worker, trials=10_000, show_progress=False,
                                   timeout=args.seconds)
                best = best_of_finalists(study, worker)  # as the pipeline picks the winner (re-scores estimates)
                seconds = clock() - start
                passes = worker.evaluator.computed - before
                finished = sum(map(worked, study.trials))
                pruned = sum(t.state.name == "PRUNED" for t in study.trials)
                repeats = sum(t.user_attrs.get("reused_from") is not None for t in study.trials)
                failed = sum(t.state.name == "FAIL" for t in study.trials)
                heldout = worker.score_config(winner_config(best), "heldout").weighted(worker.objectives)
            rows[mode].append((finished * 3600 / seconds, passes / max(1, finished), heldout))
            print(f"seed {seed} {mode:<18} trials {finished:4d} (pruned {pruned}, "
                  f"repeats not counted {repeats}, failed {failed}) "
                  f"in {seconds:5.1f} s  forward passes {passes:6d}  winner held-out {heldout:.4f}", flush=True)

    full_rate = statistics.mean(r[0] for r in rows["full"]) if "full" in rows else None
    print(f"\n== {args.seconds:.0f} {args.clock} s of search a run (+ choosing the winner), seeds {args.seeds}, "
          f"recipe {Path(args.recipe).name} (means over seeds; held-out vs full per seed) ==")
    print("| mode | trials/hour | vs full | forward passes per trial | winner held-out | held-out vs full, per seed |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, r in rows.items():
        rate = statistics.mean(x[0] for x in r)
        per_trial = statistics.mean(x[1] for x in r)
        held = statistics.mean(x[2] for x in r)
        ratio = f"{rate / full_rate:.2f}x" if full_rate else "-"
        deltas = (" / ".join(f"{x[2] - f[2]:+.3f}" for x, f in zip(r, rows["full"], strict=False))
                  if "full" in rows else "-")
        print(f"| {mode} | {rate:.0f} | {ratio} | {per_trial:.0f} | {held:.4f} | {deltas} |")

if __name__ == "__main__":
    main()
