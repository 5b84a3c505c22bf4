"""The whole run, in data-flow order: recipe -> sampler -> worker -> study -> winner, report -> publish.

``run_recipe`` runs one search in a run folder; ``run_stages`` runs a staged recipe's searches
in order, each in its own sub-folder, a later one merging an earlier one's winner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from mergekit.options import MergeOptions

from mergekit_evolve.evaluate.example_store import ExampleStore
from mergekit_evolve.evaluate.suite import TaskSetupError
from mergekit_evolve.merge.memory_plan import MemoryPlanError
from mergekit_evolve.merge.resident import ModelNotFoundError, WeightsError
from mergekit_evolve.preflight import check_recipe
from mergekit_evolve.publish.card import write_card
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.hub import publish_run, resolve_token
from mergekit_evolve.publish.names import SourceNames, template_models
from mergekit_evolve.recipe.document import RecipeDocument
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.stages import Stage
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.finalists import best_of_finalists
from mergekit_evolve.report.pareto import select_trial, weighted_target, write_pareto
from mergekit_evolve.report.winner import (
    plot_history,
    winner_config,
    write_best,
    write_report,
)
from mergekit_evolve.runfolder import RunDirError, RunFolder
from mergekit_evolve.samplers.registry import SamplerSetupError, prepare_recipe
from mergekit_evolve.study.jobs import (
    ParallelError,
    WorkerJob,
    WorkerPlan,
    plan_workers,
    run_parallel,
)
from mergekit_evolve.study.parallel import run_local
from mergekit_evolve.study.ray_actors import run_ray
from mergekit_evolve.study.search import TooManyFailures, counted, run_search
from mergekit_evolve.study.storage import (
    StorageError,
    check_storage,
    close_storage,
    default_storage_url,
    open_storage,
)
from mergekit_evolve.study.worker import (
    CandidateError,
    Worker,
    merge_options,
    plan_memory,
)

LOG = logging.getLogger(__name__)
SETUP_ERRORS = (RecipeError, ModelNotFoundError, WeightsError, TaskSetupError, SamplerSetupError, RunDirError,
                PublishError, ParallelError, StorageError, MemoryPlanError)


class RunFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to search: that is the recipe, with any command-line overrides applied)."""

    timeout: float | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    show_progress: bool = True
    ray: str | None = None  # "auto" or a cluster address: the workers as Ray actors
    publish: bool = True  # False: leave the recipe's publish: section to a later `mergekit-evolve publish`


def run_recipe(recipe: Recipe, run_dir: Path, options: RunOptions = RunOptions(),
               shared_dir: Path | None = None) -> dict[str, Any]:
    """One search in ``run_dir``; ``shared_dir`` (a staged run's root) keeps the sources' scores for every stage."""
    assert recipe.evolve is not None
    folder = RunFolder(run_dir)
    merge = merge_options(recipe, options.trust_remote_code)
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)
    publishes = _publishes(recipe, options)
    try:
        # Everything that can be wrong with the input is found before the run folder is touched.
        recipe = prepare_recipe(recipe)  # checks the sampler fits; CycleQD adds its mutation
        folder.check(recipe.fingerprints(), options.overwrite)
        if publishes:
            resolve_token()  # the push at the end needs one: say so now, not after the search
            _check_license(recipe, run_dir)
        plan = plan_workers(recipe.evolve, options.ray)
        if recipe.evolve.storage:
            check_storage(recipe.evolve.storage)
        suite = check_recipe(recipe, merge, options.allow_pickle)  # files, architectures, tasks: no weights yet
        memory = plan_memory(recipe, merge)
        LOG.info("\n".join(memory.lines()))
        memory.check()  # before any weight is loaded
        facts = {"config": recipe.config_fingerprint(), "tasks": suite.files()}
        changed = _changes(folder, recipe, facts, options.overwrite)
        # a resume's checks read (never write: this process holds no lock yet) what the run stored, so they
        # score nothing again; not a changed task's results (discarded below) nor a run --overwrite deletes
        reuse = folder.run_file.exists() and not options.overwrite and not changed.get("tasks")
        store = ExampleStore(reads=folder.examples_db if reuse else None)
        worker = Worker(recipe, merge, allow_pickle=options.allow_pickle, suite=suite, store=store)
        worker.check_start_point()  # one merge and one example per objective: fails here, not in every trial
    except (*SETUP_ERRORS, CandidateError) as e:
        raise RunFailed(str(e)) from None
    try:
        with folder.lock():
            if changed and options.overwrite:
                folder.clear()
            elif changed.get("tasks"):
                LOG.warning("%s changed since this run's trials; its stored per-example results are discarded",
                            ", ".join(changed["tasks"]))
                folder.examples_db.unlink(missing_ok=True)
            folder.prepare(recipe.fingerprints(), recipe.path, recipe.text, options.overwrite, **facts)
            worker.use_store(run_dir, shared_dir)
            _check_objectives_vary(recipe, worker)
            return _search(recipe, run_dir, worker, plan, merge, options)
    except RunDirError as e:
        raise RunFailed(str(e)) from None


def _changes(folder: RunFolder, recipe: Recipe, facts: dict[str, Any], overwrite: bool) -> dict[str, list[str]]:
    """What changed since the run in ``folder`` started, other than its search space (that is another run).

    A changed merge config or task file makes completed trials' scores incomparable: refused
    (``--overwrite`` starts over). A run with no completed trial (one stopped by a broken recipe)
    resumes with the fix; per-example results of a changed task are discarded, never reused."""
    stored = folder.stored()
    if stored.get("fingerprint") not in recipe.fingerprints():
        return {}
    changed: dict[str, list[str]] = {}
    if stored.get("config", facts["config"]) != facts["config"]:
        changed["config"] = ["the merge config (models, methods, fixed values)"]
    old_tasks = stored.get("tasks", facts["tasks"])
    tasks = sorted(f for f in {*old_tasks, *facts["tasks"]} if old_tasks.get(f) != facts["tasks"].get(f))
    if tasks:  # named as files of this machine, though stored relative to the recipe's folder
        changed["tasks"] = [str(recipe.base_dir.resolve() / f) for f in tasks]
    if not changed or overwrite:
        return changed
    complete = _completed(folder)
    if complete:
        what = "; ".join(x for v in changed.values() for x in v)
        raise RunDirError(f"{folder.path}: {what} changed since its {complete} completed trials were scored, so their "
                          "scores would not compare; pass --overwrite to delete this run and start over, or choose "
                          "another --run-dir")
    return changed


def _completed(folder: RunFolder) -> int:
    """Completed trials as the run's trials.jsonl lists them."""
    if not folder.trials.exists():
        return 0
    lines = folder.trials.read_text(encoding="utf-8").splitlines()
    return sum(json.loads(line).get("state") == "COMPLETE" for line in lines if line.strip())


def _check_objectives_vary(recipe: Recipe, worker: Worker) -> None:
    """Stop when every source scores the same extreme (all 0, all 1) on an objective: the search could
    not tell candidates apart. The sources' results are stored; the report reuses them."""
    assert recipe.evolve is not None
    if recipe.evolve.allow_constant_objectives:
        return
    dtype = recipe.compile(recipe.search_space.default_point()).dtype
    scores = [worker.source_scores(model, "search", dtype) for model in worker.sources]
    for i, obj in enumerate(recipe.evolve.objectives):
        values = {s.values[obj.name] for s in scores}
        if len(values) == 1 and values <= {0.0, 1.0}:
            raise RunFailed(str(recipe.error(
                ("evolve", "objectives", i, obj.field),
                f"every source model scores {values.pop():g} on {obj.name}, so the search cannot tell candidates "
                "apart. Usual causes: a loglikelihood target without its leading space (lm-eval ignores "
                "target_delimiter there), a metric or filter that reads the wrong field, an answer format the models "
                "never produce, or too few examples (limit). If it is expected, "
                "set evolve.allow_constant_objectives: true",
            )))


def _search(recipe: Recipe, run_dir: Path, worker: Worker, plan: WorkerPlan, merge: MergeOptions,
            options: RunOptions) -> dict[str, Any]:
    assert recipe.evolve is not None
    folder = RunFolder(run_dir)
    trials = recipe.evolve.trials
    try:
        if plan.parallel:
            job = WorkerJob.for_run(recipe, run_dir, merge, options.allow_pickle, trials, options.timeout)
            runner = run_ray if plan.ray is not None else run_local
            study = run_parallel(plan, recipe, run_dir, worker, job, runner, options.show_progress)
        else:
            study = run_search(recipe, run_dir, worker, trials, options.show_progress, timeout=options.timeout)
    except (TooManyFailures, ParallelError) as e:
        raise RunFailed(str(e)) from None
    best = select_trial(study, recipe.evolve) if recipe.evolve.multi_objective else best_of_finalists(study, worker)
    LOG.info("writing the winner (trial %d) to %s", best.number, folder.best)
    write_best(run_dir, folder.recipe, winner_config(best), merge)
    if recipe.evolve.multi_objective:
        plot_history(run_dir, study, target=weighted_target(recipe.evolve))
        write_pareto(run_dir, study, recipe.evolve, best)
    else:
        plot_history(run_dir, study)
    report = write_report(run_dir, study, worker, best)
    write_card(run_dir)  # needs report.json; replaces mergekit's plain card
    worker.evaluator.store.close()
    close_storage(study)  # before a push: study.db must hold every trial, not leave some in its WAL
    if options.publish and recipe.publish and recipe.publish.repo:
        try:
            publish_run(run_dir, recipe.publish)
        except PublishError as e:
            raise RunFailed(f"the run is complete in {run_dir}, but publishing failed: {e}") from None
    return {**report, "run_dir": str(run_dir)}


def _check_license(recipe: Recipe, run_dir: Path) -> None:
    """The card needs a license: the recipe's, or one every source's card states; asked for before the search."""
    assert recipe.publish is not None
    if recipe.publish.license:
        return
    names = SourceNames.for_run(run_dir, recipe.path, recipe.publish.hub_ids)
    license, why = names.common_license(template_models(recipe.template))
    if license is None:
        raise PublishError(f"publish: no license for the model card ({why}); set publish.license in the recipe")


def _publishes(recipe: Recipe, options: RunOptions) -> bool:
    if not (recipe.publish and recipe.publish.repo):
        return False
    if not options.publish:
        LOG.warning("not publishing to %s at the end of this run (--no-publish): "
                    "`mergekit-evolve publish RUN_DIR` does it", recipe.publish.repo)
    return options.publish


# --- staged recipes ---------------------------------------------------------------------------


def _digest(stage: RunFolder) -> str:
    """Which winner a stage wrote: the digest of its concrete config."""
    return hashlib.sha256(stage.best_config.read_bytes()).hexdigest()[:16]


def _check_upstream(stage: Stage, run_dir: Path, overwrite: bool) -> None:
    """Refuse (or restart with ``overwrite``) a stage searched with an earlier winner than today's."""
    state_file = RunFolder(run_dir).stages_state
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    current = {name: _digest(RunFolder(run_dir).stage(name)) for name in stage.uses}
    before = state.get(stage.name)
    if before is not None and before != current and stage.run_dir.exists():
        changed = ", ".join(n for n in current if before.get(n) != current[n])
        if not overwrite:
            raise RunFailed(
                f"stage '{stage.name}' in {stage.run_dir} was searched with an earlier winner of stage {changed}; "
                f"pass --overwrite to restart stage '{stage.name}', or choose another --run-dir"
            )
        LOG.warning("stage %s: the winner of %s changed; restarting it", stage.name, changed)
        shutil.rmtree(stage.run_dir)
    state[stage.name] = current
    state_file.write_text(json.dumps(state, indent=2))


def _finished(stage: Stage) -> dict[str, Any] | None:
    """The report of a stage that already reached its trials with this recipe, else None."""
    folder = RunFolder(stage.run_dir)
    if not (folder.report.exists() and folder.best.exists()):
        return None
    stored = folder.stored()
    if stored.get("fingerprint") not in stage.recipe.fingerprints() or \
            stored.get("config", stage.recipe.config_fingerprint()) != stage.recipe.config_fingerprint():
        return None
    settings = stage.recipe.evolve
    assert settings is not None
    storage = open_storage(settings.storage or default_storage_url(stage.run_dir))
    try:
        study = optuna.load_study(study_name=settings.study_name or stage.recipe.name, storage=storage)
    except KeyError:
        return None
    return json.loads(folder.report.read_text()) if counted(study) >= settings.trials else None


def run_stages(document: RecipeDocument, run_dir: Path, options: RunOptions = RunOptions()) -> list[dict[str, Any]]:
    """Run every stage in order; returns each stage's report (with ``stage`` and ``run_dir``)."""
    if RunFolder(run_dir).run_file.exists():
        raise RunFailed(f"{run_dir} holds a one-stage run; choose another --run-dir for a staged recipe")

    def parse(until: str | None = None) -> list[Stage]:
        try:
            return document.stages(run_dir, until)
        except RecipeError as e:
            raise RunFailed(str(e)) from None

    planned = parse()  # every stage is checked before any search
    try:
        with RunFolder(run_dir).lock():
            return [_run_stage(parse(until=p.name)[-1], run_dir, options) for p in planned]
    except RunDirError as e:
        raise RunFailed(str(e)) from None


def _run_stage(stage: Stage, run_dir: Path, options: RunOptions) -> dict[str, Any]:
    """One stage (parsed again now that earlier winners exist: real layer counts), unless it already finished."""
    _check_upstream(stage, run_dir, options.overwrite)
    report = _finished(stage)
    if report is not None:
        LOG.info("stage %s: already finished (%s); not run again", stage.name, stage.run_dir)
        report = {**report, "run_dir": str(stage.run_dir)}
    else:
        LOG.info("stage %s: searching in %s", stage.name, stage.run_dir)
        report = run_recipe(stage.recipe, stage.run_dir, options, shared_dir=run_dir)
    return {**report, "stage": stage.name}
