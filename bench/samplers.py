"""Sampler comparison at an equal trial budget, over several seeds, on one recipe (the demo by default).

    python bench/samplers.py [--recipe recipes/demo.yml] [--trials 40] [--seeds 0 1 2]
                             [--samplers random tpe cmaes cma cycleqd swarm] [--json OUT.json]

Each (sampler, seed) is a full search through the real machinery (``prepare_recipe``,
``run_search`` with its SQLite study in a temporary run folder), all in this one process on the
same resident models and lm-eval tasks. For every run, each new incumbent (best so far on the
search split) is scored on the held-out split; reported per sampler:

- held-out: the held-out weighted objective of the run's winner (mean and sd over seeds);
- to 95% own: trials until the incumbent's held-out score first reaches 95% of that run's
  winner (median and range over seeds);
- to 95% best: the same against one common target, 95% of the best winner of all runs
  (median over the seeds that reached it, and how many did);
- search: the winner's weighted objective on the search split.
The source models are scored too, for reference.

Each run starts with no stored examples (``Worker.use_recipe``), as a fresh run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # Optuna's notes on its own experimental APIs
warnings.filterwarnings("ignore", module="optuna")

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mergekit_evolve.recipe.document import load_recipe  # noqa: E402
from mergekit_evolve.recipe.evolve_settings import EvolveSettings  # noqa: E402
from mergekit_evolve.recipe.parse import Recipe  # noqa: E402
from mergekit_evolve.report.winner import winner_config  # noqa: E402
from mergekit_evolve.samplers.registry import SamplerSetupError, prepare_recipe  # noqa: E402
from mergekit_evolve.study.search import run_search  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options, source_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Options that fit a budget of tens of trials; everything else is each sampler's default.
OPTIONS: dict[str, dict] = {
    "random": {}, "tpe": {}, "cmaes": {}, "cma": {}, "gp": {}, "nsga2": {"population_size": 8},
    "cycleqd": {"children": 4}, "swarm": {"particles": 6},
}


@dataclass
class Run:
    sampler: str
    seed: int
    search: float
    heldout: float
    trials_to_95: int
    incumbents: list[tuple[int, float, float]]  # (trials so far, search, held-out)


def variant(path: Path, sampler: str, seed: int) -> Recipe:
    recipe = load_recipe(path)
    # validated from the recipe's own section, so settings derived from the sampler (the auto pruner) are this one's
    settings = {**recipe.doc.data["evolve"], "sampler": sampler, "seed": seed, "sampler_options": OPTIONS[sampler],
                "multi_objective": False}
    return prepare_recipe(dataclasses.replace(recipe, evolve=EvolveSettings.model_validate(settings)))


def one_run(worker: Worker, recipe: Recipe, trials: int, heldout_cache: dict[str, float]) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        worker.use_recipe(recipe)  # the same resident models and tasks; this run's space and sampler
        study = run_search(recipe, Path(tmp), worker, trials, show_progress=False)
    finished = [t for t in study.trials if t.state.is_finished()]
    incumbents: list[tuple[int, float, float]] = []
    best = float("-inf")
    for count, trial in enumerate(finished, start=1):
        if trial.state == TrialState.COMPLETE and trial.value > best:
            best = trial.value
            digest = trial.user_attrs["config_digest"]
            if digest not in heldout_cache:
                scores = worker.score_config(winner_config(trial), "heldout")
                heldout_cache[digest] = scores.weighted(worker.objectives)
            incumbents.append((count, best, heldout_cache[digest]))
    final = incumbents[-1][2]
    to_95 = next(count for count, _, heldout in incumbents if heldout >= 0.95 * final)
    return Run(recipe.evolve.sampler, recipe.evolve.seed, best, final, to_95, incumbents)


def trials_to(run: Run, target: float) -> int | None:
    return next((count for count, _, heldout in run.incumbents if heldout >= target), None)


def table(runs: list[Run], samplers: list[str], skipped: dict[str, str],
          sources: dict[str, tuple[float, float]]) -> str:
    target = 0.95 * max(r.heldout for r in runs)
    lines = [
        "| sampler | held-out (mean ± sd) | to 95% own (median [min-max]) | "
        f"to 95% best = {target:.4f} (median, reached) | search (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in samplers:
        if s in skipped:
            lines.append(f"| {s} | n/a: {skipped[s]} | | | |")
            continue
        rs = [r for r in runs if r.sampler == s]
        held = [r.heldout for r in rs]
        sd = statistics.stdev(held) if len(held) > 1 else 0.0
        own = [r.trials_to_95 for r in rs]
        common = [n for n in (trials_to(r, target) for r in rs) if n is not None]
        reached = f"{statistics.median(common):g}, {len(common)}/{len(rs)}" if common else f"-, 0/{len(rs)}"
        lines.append(
            f"| {s} | {statistics.mean(held):.4f} ± {sd:.4f} | {statistics.median(own):g} [{min(own)}-{max(own)}] "
            f"| {reached} | {statistics.mean(r.search for r in rs):.4f} |"
        )
    for name, (search, heldout) in sources.items():
        lines.append(f"| source {name} | {heldout:.4f} | | | {search:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yml")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe", "cmaes", "cma", "cycleqd", "swarm"],
                        choices=list(OPTIONS))
    parser.add_argument("--json", type=Path, default=None, help="also write every run (incumbent curves) here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = load_recipe(args.recipe)
    if base.evolve.threads:  # as the pipeline does
        torch.set_num_threads(base.evolve.threads)
    worker = Worker(base, merge_options(base))
    runs: list[Run] = []
    skipped: dict[str, str] = {}
    heldout_cache: dict[str, float] = {}
    for sampler in args.samplers:
        for seed in args.seeds:
            try:
                recipe = variant(args.recipe, sampler, seed)
            except SamplerSetupError as e:
                skipped[sampler] = str(e)
                break
            run = one_run(worker, recipe, args.trials, heldout_cache)
            runs.append(run)
            print(f"{sampler:<8} seed {seed}: search {run.search:.4f}  held-out {run.heldout:.4f}  "
                  f"to 95% {run.trials_to_95:3d} trials", flush=True)
    print(f"\n== {args.trials} trials a run, seeds {args.seeds}, recipe {args.recipe.name}, "
          f"objective {' + '.join(f'{o.weight:g}*{o.name}' for o in base.evolve.objectives)} ==")
    sources = {
        Path(str(m)).name: tuple(worker.score_config(source_config(m, base.template.get("dtype")),
                                                     split).weighted(worker.objectives)
                                 for split in ("search", "heldout"))
        for m in worker.sources
    }
    print(table(runs, args.samplers, skipped, sources))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
