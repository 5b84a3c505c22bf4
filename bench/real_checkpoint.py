"""A real checkpoint (SmolLM2-135M with its two LoRA experts, recipes/smollm2): this project vs the
pipeline a user would otherwise run, and short searches; prints its figures, all measured in this one run.

    python bench/real_checkpoint.py [--recipe recipes/smollm2/recipe.yml] [--candidates 3] [--trials 6] [--anchors 16]

1. Searches, each as the CLI runs it (``run_recipe`` in a temporary run folder): the recipe's
   cheap fitness (every objective with ``anchors``, the pruner the recipe's sampler resolves
   ``auto`` to) vs full scoring (no anchors, no pruner), ``--trials`` each. Per search: trials
   per hour of search (choosing the winner included), the winner's search and held-out scores,
   and the seconds of setup (sources, tasks, the sources' search scores), search, and report
   phase (``best/`` written by mergekit's ``run_merge``, winner and sources scored, plots,
   card), with the examples the report phase ran through the model. Then the process's peak
   RSS against the memory plan (``--dry-run`` prints it).
2. Per candidate (``--candidates`` configs compiled from the recipe: its start point, then
   random points), seconds to merge, load and score on the search split: this project (merge
   into the resident model, its Evaluator) vs mergekit's ``run_merge`` of the same config to a
   temporary folder, transformers' ``from_pretrained``, and lm-eval's ``simple_evaluate`` with the
   same tasks and limits. The scores are asserted equal. The user pipeline is given its best
   case: one ``lora_merge_cache`` for all candidates (the adapters are merged into the base once)
   and the suite's task index, built once.

``--recipe recipes/demo.yml`` runs it on the demo models (no prepared checkpoint needed).
``--dtype bfloat16`` runs the recipe in bfloat16: its ``prepared:`` models as their bf16 conversions and
its top-level ``dtype`` changed, in a temporary copy of the recipe's folder (links to its files).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402

import mergekit_evolve.pipeline as pipeline  # noqa: E402
from mergekit_evolve.prepared import SCHEME, parse_reference  # noqa: E402
from mergekit_evolve.recipe.compile import config_digest  # noqa: E402
from mergekit_evolve.recipe.document import load_recipe  # noqa: E402
from mergekit_evolve.recipe.overrides import Overrides  # noqa: E402
from mergekit_evolve.recipe.parse import Recipe  # noqa: E402
from mergekit_evolve.study.search import counted  # noqa: E402
from mergekit_evolve.study.suggest import suggest_point  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options, plan_memory  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def fitness(recipe: Recipe, mode: str, anchors: int) -> Recipe:
    """The recipe scored in ``mode``, validated as a recipe's YAML is (only what is set counts, so an
    auto pruner resolves as for a user): ``cheap`` gives every objective ``anchors``; ``full`` none, unpruned."""
    settings = recipe.evolve.model_dump(exclude_unset=True)
    settings["objectives"] = [{**o, "anchors": anchors if mode == "cheap" else None} for o in settings["objectives"]]
    settings["pruning"] = {**settings.get("pruning", {}), **({"pruner": "none"} if mode == "full" else {})}
    recipe.evolve = type(recipe.evolve).model_validate(settings)
    return recipe


class Phases:
    """Timestamps of one ``run_recipe``: the search starts and ends (the winner chosen), the report phase's parts."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.report_examples = 0
        self.trials = 0

    def install(self) -> None:
        run_search, choose, write_best, write_report = (
            pipeline.run_search, pipeline.best_of_finalists, pipeline.write_best, pipeline.write_report)

        def timed_search(*args: Any, **kwargs: Any) -> optuna.Study:
            self.marks["search_start"] = time.perf_counter()
            return run_search(*args, **kwargs)

        def timed_choice(study: optuna.Study, worker: Worker) -> optuna.trial.FrozenTrial:
            best = choose(study, worker)  # anchor estimates: finalists re-scored, part of the search's cost
            self.marks["search_end"] = time.perf_counter()
            self.trials = counted(study)  # here: the pipeline closes the study's storage before it returns
            return best

        def timed_best(*args: Any, **kwargs: Any) -> Path:
            t = time.perf_counter()
            out = write_best(*args, **kwargs)
            self.marks["best"] = time.perf_counter() - t
            return out

        def timed_report(run_dir: Path, study: optuna.Study, worker: Worker, best: optuna.trial.FrozenTrial) -> dict:
            t, before = time.perf_counter(), worker.evaluator.computed
            out = write_report(run_dir, study, worker, best)
            self.marks["scoring"], self.report_examples = time.perf_counter() - t, worker.evaluator.computed - before
            return out

        pipeline.run_search, pipeline.best_of_finalists = timed_search, timed_choice
        pipeline.write_best, pipeline.write_report = timed_best, timed_report


def searches(recipe_path: str, trials: int, anchors: int) -> None:
    phases = Phases()
    phases.install()
    rows = []
    for mode in ("cheap", "full"):
        recipe = fitness(Overrides(trials=trials).apply(load_recipe(recipe_path)), mode, anchors)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = pipeline.run_recipe(recipe, Path(tmp) / "run",
                                         pipeline.RunOptions(show_progress=False, publish=False))
            end = time.perf_counter()
        m = phases.marks
        search_s, report_s = m["search_end"] - m["search_start"], end - m["search_end"]
        done = phases.trials
        pruner = recipe.evolve.pruning.pruner
        label = f"{mode} ({'anchors ' + str(anchors) + ', ' if mode == 'cheap' else ''}pruner {pruner})"
        rows.append((label, done, done * 3600 / search_s, report["winner"]["search"], report["winner"]["heldout"],
                     m["search_start"] - start, search_s, report_s, m["best"], m["scoring"], phases.report_examples))
        gc.collect()  # the run's worker (resident model, sources) goes before the next one's
    print(f"\n== searches: {trials} trials each of {Path(recipe_path).name} (sampler {recipe.evolve.sampler}), "
          "as the CLI runs them ==")
    print("| fitness | trials | trials/hour | winner search | winner held-out | setup s | search s | "
          "report phase s (best/ s, scoring s, examples) | report / search |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for label, done, rate, search, heldout, setup_s, search_s, report_s, best_s, scoring_s, examples in rows:
        print(f"| {label} | {done} | {rate:.0f} | {search:.3f} | {heldout:.3f} | {setup_s:.1f} | {search_s:.1f} | "
              f"{report_s:.1f} ({best_s:.1f}, {scoring_s:.1f}, {examples}) | {report_s / search_s:.2f} |")
    print(f"cheap vs full trials/hour: {rows[0][2] / rows[1][2]:.2f}x")


def candidates(recipe: Recipe, n: int) -> list[MergeConfiguration]:
    """The recipe's start point, then random points (as a random sampler would propose them)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = [recipe.search_space.default_point()] + [suggest_point(study.ask(), recipe.search_space)
                                                      for _ in range(n - 1)]
    return [recipe.compile(p) for p in points]


def user_pipeline(worker: Worker, config: MergeConfiguration, tmp: Path,
                  lora_cache: Path) -> tuple[list[float], dict[str, float]]:
    """mergekit's run_merge to a folder, from_pretrained, lm-eval's simple_evaluate: seconds of each, and the scores."""
    settings = worker.recipe.evolve
    out = tmp / "merged"
    options = worker.merger.options.model_copy(update={"lora_merge_cache": str(lora_cache), "copy_tokenizer": True})
    t0 = time.perf_counter()
    run_merge(config.model_copy(deep=True), str(out), options=options)
    t1 = time.perf_counter()
    # in the dtype the merge wrote, as the resident model holds it
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, config.dtype or "float32"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    t2 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=str(model.device))
    by_limit: dict[Any, list[tuple[str, str, str]]] = {}
    for o in settings.objectives:
        task, limit = worker.suite.task_for(o, "search")
        by_limit.setdefault(limit, []).append((o.name, task, o.metric))
    scores: dict[str, float] = {}
    for limit, objectives in by_limit.items():
        # the tasks' data files are relative to the recipe, as lm-eval run from there
        with contextlib.chdir(worker.recipe.base_dir):
            results = simple_evaluate(
                model=lm, tasks=sorted({task for _, task, _ in objectives}), task_manager=worker.suite.manager,
                limit=limit, bootstrap_iters=0, log_samples=False, apply_chat_template=settings.apply_chat_template,
                verbosity="WARNING",
            )["results"]
        scores.update({name: float(results[task][metric]) for name, task, metric in objectives})
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], scores


def per_candidate(recipe_path: str, n: int) -> None:
    recipe = load_recipe(recipe_path)
    t = time.perf_counter()
    worker = Worker(recipe, merge_options(recipe))
    setup = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora_cache = Path(tmp) / "lora"
        for k, config in enumerate(candidates(recipe, n)):
            t0 = time.perf_counter()
            model = worker.merger.materialize(config)
            t1 = time.perf_counter()
            ours = worker.evaluator.score(model, "search", digest=config_digest(config)).values
            t2 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=tmp) as one:
                theirs_s, theirs = user_pipeline(worker, config, Path(one), lora_cache)
            for name, value in ours.items():
                assert math.isclose(value, theirs[name], rel_tol=1e-9, abs_tol=1e-12), (k, name, value, theirs[name])
            rows.append(([t1 - t0, 0.0, t2 - t1], theirs_s, ours))
    print(f"\n== per candidate: {n} configs of {Path(recipe_path).name}, scored on the search split ==")
    print("(this project's one-off setup, paid once per run: sources resident, tasks built, "
          f"warm-up merge: {setup:.1f} s)")
    print("| candidate | scores (equal in both) | this project: merge / load / score s | "
          "run_merge + from_pretrained + simple_evaluate: merge / load / score s | ratio |")
    print("|---|---|---|---|---:|")
    for k, (ours_s, theirs_s, scores) in enumerate(rows):
        values = ", ".join(f"{v:.3f}" for v in scores.values())
        print(f"| {k} | {values} | {' / '.join(f'{s:.2f}' for s in ours_s)} = {sum(ours_s):.2f} | "
              f"{' / '.join(f'{s:.2f}' for s in theirs_s)} = {sum(theirs_s):.2f} | "
              f"{sum(theirs_s) / sum(ours_s):.2f}x |")
    ours_total, theirs_total = (sum(sum(r[i]) for r in rows) for i in (0, 1))
    print(f"| all | | {ours_total:.2f} | {theirs_total:.2f} | {theirs_total / ours_total:.2f}x |")


def in_dtype(recipe_path: str, dtype: str, folder: Path) -> str:
    """The recipe at ``recipe_path`` merged in ``dtype`` (its ``prepared:`` models as their ``dtype`` conversions),
    written into ``folder`` beside links to its folder's files (paths in a recipe and its tasks are relative to it)."""
    source = Path(recipe_path).resolve()
    for entry in source.parent.iterdir():
        if entry != source:
            (folder / entry.name).symlink_to(entry)

    def converted(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: converted(v) for k, v in value.items()}
        if isinstance(value, list):
            return [converted(v) for v in value]
        model, plus, adapter = value.partition("+") if isinstance(value, str) else ("", "", "")
        reference = parse_reference(model)
        return f"{SCHEME}{reference[0]}@{dtype}{plus}{adapter}" if reference else value

    recipe = {**converted(yaml.safe_load(source.read_text())), "dtype": dtype}
    (folder / source.name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(folder / source.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2" / "recipe.yml"))
    parser.add_argument("--candidates", type=int, default=3, help="configs compared per candidate")
    parser.add_argument("--trials", type=int, default=6, help="trials of each search")
    parser.add_argument("--anchors", type=int, default=16, help="anchor examples per objective of the cheap fitness")
    parser.add_argument("--section", choices=["all", "search", "candidates"], default="all")
    parser.add_argument("--dtype", choices=["bfloat16"], default=None, help="merge in this dtype instead")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, in_dtype(args.recipe, args.dtype, Path(tmp)) if args.dtype else args.recipe)


def run(args: argparse.Namespace, recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)  # as the CLI does
    if args.section in ("all", "search"):
        searches(recipe_path, args.trials, args.anchors)
        # before the user pipeline's models: this is the peak of the runs themselves
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plan = plan_memory(recipe, merge_options(recipe)).total
        print(f"peak RSS of the process (both runs) {peak / GIB:.2f} GiB; memory plan {plan / GIB:.2f} GiB")
    if args.section in ("all", "candidates"):
        per_candidate(recipe_path, args.candidates)


if __name__ == "__main__":
    main()
