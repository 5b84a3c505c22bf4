"""One process's resident state: source tensors, the resident model, the lm-eval tasks.

Built once; every trial then only merges into the resident model and scores it.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import transformers
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_evolve.evaluate.anchors import AnchorSet, choose_anchors
from mergekit_evolve.evaluate.example_objectives import ObjectiveError
from mergekit_evolve.evaluate.example_store import ExampleStore, ScoreCache
from mergekit_evolve.evaluate.judge import JudgeScorer, Reference
from mergekit_evolve.evaluate.scores import Scores, study_values
from mergekit_evolve.evaluate.suite import Evaluator, Split, TaskSetupError, TaskSuite
from mergekit_evolve.merge.engine import InMemoryMerger, resolve_device
from mergekit_evolve.merge.memory_plan import MemoryPlan, memory_plan
from mergekit_evolve.merge.resident import local_folder, make_resident
from mergekit_evolve.recipe.compile import config_digest
from mergekit_evolve.recipe.evolve_settings import JudgeObjective
from mergekit_evolve.recipe.model_paths import resolve_model_path
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.runfolder import RunFolder
from mergekit_evolve.study.pruning import staged_scores
from mergekit_evolve.study.suggest import suggest_point

LOG = logging.getLogger(__name__)
# what a repeated config's trial copies from the trial that scored it: its scores and a parsed judge's misses
REUSED_ATTRS = ("scores", "unparsed")
# failed trials' tracebacks: always in the run folder's failures.log, on the console with -v
TRACEBACKS = logging.getLogger("mergekit_evolve.tracebacks")


def score_attrs(scores: Scores) -> dict[str, Any]:
    """The user attributes (``REUSED_ATTRS``) a scored trial keeps, and a repeat of its config copies."""
    attrs: dict[str, Any] = {"scores": scores.values}
    if scores.unparsed:
        attrs["unparsed"] = {name: list(count) for name, count in scores.unparsed.items()}
    return attrs


def set_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


class CandidateError(RuntimeError):
    """The recipe's start point cannot be merged or scored: every trial would fail the same way."""


def interrupted(error: BaseException | None) -> bool:
    """A Ctrl-C, or an error raised over one: Optuna's clean-up of a trial, or a library that wraps what its
    callback raised (pydantic's serializers, inside mergekit's config dump)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def merge_options(recipe: Recipe, trust_remote_code: bool = False) -> MergeOptions:
    settings = recipe.evolve
    dev = resolve_device(settings.device if settings else "auto")
    return MergeOptions(
        device=dev,
        random_seed=settings.seed if settings else None,
        trust_remote_code=trust_remote_code,
        allow_crimes=bool(settings and settings.allow_crimes),
        quiet=True,
    )


def source_models(recipe: Recipe) -> list[ModelReference]:
    """Every model the recipe merges, base first, in recipe order."""
    config = recipe.compile(recipe.search_space.default_point())
    ordered: list[ModelReference] = [config.base_model] if config.base_model else []
    # a routed recipe's default path may use only the first model: the others are sources too
    routed = [ModelReference.model_validate(m) for m in (recipe.template.get("routing") or {}).get("models", [])]
    for m in [*config.referenced_models(), *routed]:
        if m not in ordered:
            ordered.append(m)
    return ordered


def plan_memory(recipe: Recipe, options: MergeOptions) -> MemoryPlan:
    """The run's memory plan, from file headers only (``--dry-run`` prints it; a run checks it first)."""
    sources = source_models(recipe)
    folders = {str(m): local_folder(m, options) for m in sources}
    config = recipe.compile(recipe.search_space.default_point())
    return memory_plan(sources, folders, config.out_dtype or config.dtype, options.device or "cpu",
                       recipe.evolve.batch_size)


def source_config(model: ModelReference, dtype: str | None) -> MergeConfiguration:
    """A config whose merge is ``model`` itself, to score a source through the same path."""
    return MergeConfiguration(merge_method="passthrough", models=[{"model": model}], dtype=dtype)


def weights_stamp(model: ModelReference, options: MergeOptions) -> str:
    """The name, size and modification time of every file of ``model``'s folder (and its adapter's):
    it changes when the weights at that path are rewritten."""
    folders = [Path(local_folder(model, options))] + ([Path(model.lora.path)] if model.lora else [])
    files = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for d in folders for f in d.iterdir()
                   if f.is_file())
    return hashlib.sha256(repr(files).encode()).hexdigest()[:16]


def reference_source(recipe: Recipe, objective: JudgeObjective) -> ModelReference:
    """The source a pairwise judge compares answers with: ``reference`` as the recipe's models are written
    (a local folder relative to the recipe's), by default the base model, else the first model."""
    sources = source_models(recipe)
    if objective.reference is None:
        return sources[0]
    for value in (resolve_model_path(objective.reference, recipe.base_dir), objective.reference):
        reference = ModelReference.model_validate(value)
        if reference in sources:
            return reference
    raise TaskSetupError(f"reference: '{objective.reference}' is not one of the recipe's models "
                         f"({', '.join(str(m) for m in sources)})", field="reference")


def attach_references(recipe: Recipe, suite: TaskSuite, options: MergeOptions) -> None:
    """Tell each pairwise judge which source it compares with (its folder joins the files a resume checks)."""
    assert recipe.evolve is not None
    for obj in recipe.evolve.objectives:
        scorer = suite.scorers.get(obj.name)
        if isinstance(scorer, JudgeScorer) and scorer.pairwise and scorer.reference is None:
            model = reference_source(recipe, scorer.objective)
            scorer.reference = Reference(str(model), Path(local_folder(model, options)))


class Worker:
    def __init__(self, recipe: Recipe, options: MergeOptions, allow_pickle: bool = False,
                 suite: TaskSuite | None = None, store: ExampleStore | None = None):
        """``store``: where the checks before ``use_store`` keep per-example results (default: in memory)."""
        assert recipe.evolve is not None
        self.recipe = recipe
        self.merger = InMemoryMerger(options, allow_pickle=allow_pickle)
        self.sources = source_models(recipe)
        make_resident(self.sources, options, self.merger.storage_device, allow_pickle)
        self.suite = suite or TaskSuite(recipe.evolve, recipe.base_dir)
        attach_references(recipe, self.suite, options)
        default = recipe.compile(recipe.search_space.default_point())
        donor = default.base_model or default.referenced_models()[0]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            local_folder(donor, options), trust_remote_code=options.trust_remote_code
        )
        self.evaluator = Evaluator(self.suite, self.tokenizer, store)
        # one-off costs (the resident model's instantiation, compiling the merge kernels) are
        # setup, paid here rather than by whichever trial happens to come first
        self.warmup_error: Exception | None = None
        try:
            self.merger.materialize(default)
        except Exception as e:  # kept for check_start_point, which says so before any trial
            self.warmup_error = e
            LOG.debug("warm-up merge of the recipe's default point failed", exc_info=True)
        self.failure_log: Path | None = None
        self._anchors: dict[str, AnchorSet] | None = None  # chosen on first use, from the sources' results
        # config digest -> (trial number, value, the user attributes a repeat of it carries too)
        self.known: dict[str, tuple[int, float | list[float], dict[str, Any]]] = {}
        self.source_cache = ScoreCache()  # the run folder's once use_store names it

    @property
    def objectives(self):
        return self.recipe.evolve.objectives

    def use_recipe(self, recipe: Recipe) -> None:
        """Search ``recipe`` next: the same sources and tasks under other settings (benchmarks compare them).
        It starts with no stored examples or source scores, as a fresh run would: otherwise a later setting
        with the same seed replays the earlier one's first proposals for free."""
        self.recipe = recipe
        self.suite.settings = recipe.evolve
        self._anchors, self.known = None, {}
        self.evaluator.store.close()
        self.evaluator.store = ExampleStore()
        self.source_cache = ScoreCache()

    def prepare_references(self) -> None:
        """Generate, once, the answers pairwise judges compare candidates with: each reference source is
        merged into the resident model, so this runs before a candidate is (every entry point calls it)."""
        dtype = None
        for scorer in self.suite.scorers.values():
            if isinstance(scorer, JudgeScorer) and scorer.references_needed():
                assert scorer.reference is not None
                dtype = dtype or self.recipe.compile(self.recipe.search_space.default_point()).dtype
                config = source_config(ModelReference.model_validate(scorer.reference.name), dtype)
                scorer.answer_references(self.merger.materialize(config), self.tokenizer)
                LOG.info("objective %s: the reference %s answered its prompts", scorer.objective.name,
                         scorer.reference.name)

    def anchor_sets(self) -> dict[str, AnchorSet]:
        """Anchors per objective that asks for them, chosen once from the sources' per-example results."""
        if self._anchors is not None:
            return self._anchors
        self.prepare_references()
        self._anchors = {}
        for obj in self.objectives:
            if not obj.anchors:
                continue
            plan = self.evaluator.plan(obj, "search")
            if plan.ids is None or getattr(plan.aggregate, "__name__", "") != "mean":
                raise TaskSetupError(f"objective {obj.name}: anchors need a plain task with a mean-aggregated metric "
                                     "(or an objective of another kind)")
            key = f"{plan.metric},{plan.filter}"
            table = []
            dtype = self.recipe.compile(self.recipe.search_space.default_point()).dtype
            for model in self.sources:
                config = source_config(model, dtype)  # the config the run's check of the sources scored
                rows = self.evaluator.rows(self.merger.materialize(config), config_digest(config), plan, plan.ids)
                table.append([float(r[key]) for r in rows])
            self._anchors[obj.name] = choose_anchors(np.array(table), plan.ids, obj.anchors, self.recipe.evolve.seed)
            LOG.info("objective %s: %d anchor examples of %d", obj.name, len(self._anchors[obj.name].ids),
                     len(plan.ids))
        return self._anchors

    def use_store(self, run_dir: Path, shared: Path | None = None) -> None:
        """Keep per-example results in the run folder (shared by resumes and other workers), with
        those computed before it existed, and the sources' scores in ``shared``'s (default: the
        same folder); failed trials' tracebacks go to its log."""
        folder = RunFolder(run_dir)
        if self.evaluator.store.path == folder.examples_db:
            return
        store = ExampleStore(folder.examples_db)
        store.absorb(self.evaluator.store)
        self.evaluator.store.close()
        self.evaluator.store = store
        self.failure_log = folder.log
        # a staged run's stages share one cache at its root: a source used by several is scored once
        self.source_cache = ScoreCache(RunFolder(shared or run_dir).source_scores)

    def check_start_point(self) -> None:
        """Merge the recipe's start point (init values, else the box centre) and score one example of
        every objective on both splits: what would fail every trial fails here, once, before trial 0."""
        config = self.recipe.compile(self.recipe.search_space.default_point())
        try:
            if self.warmup_error is not None:
                raise self.warmup_error
            self.prepare_references()
            model = self.merger.materialize(config)
            for obj in self.objectives:
                for split in ("search", "heldout"):
                    plan = self.evaluator.plan(obj, split)
                    if plan.ids:
                        rows = self.evaluator.rows(model, config_digest(config), plan, self.evaluator.order(plan)[:1])
                        plan.value(rows)
        except Exception as e:
            LOG.debug("the start point failed", exc_info=True)
            error = str(e) if isinstance(e, ObjectiveError) else f"{type(e).__name__}: {e}"
            raise CandidateError(f"the recipe's start point fails before any trial: {error} "
                                 "(-vv shows the traceback)") from None

    def score_config(self, config: MergeConfiguration, split: Split) -> Scores:
        self.prepare_references()
        return self.evaluator.score(self.merger.materialize(config), split, digest=config_digest(config))

    def source_scores(self, model: ModelReference, split: Split, dtype: str | None) -> Scores:
        """Source ``model`` on ``split``, scored once per run (and staged run): the cache's key names its
        config, the stamp of its files on disk (a rewritten earlier stage's winner is scored again) and
        what each objective's score depends on."""
        config = source_config(model, dtype)
        stamp = weights_stamp(model, self.merger.options)
        keys = {o.name: f"{config_digest(config)}/{stamp}/{self.evaluator.score_facts(o, split)}"
                for o in self.objectives}
        cached = {name: self.source_cache.get(key) for name, key in keys.items()}
        if all(v is not None for v in cached.values()):
            return Scores(cached)
        scores = self.score_config(config, split)
        self.source_cache.put({key: scores.values[name] for name, key in keys.items()})
        return scores

    def remember(self, study: optuna.Study) -> None:
        """Index completed trials by config digest so an identical candidate is not scored twice."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            digest = t.user_attrs.get("config_digest")
            if digest and digest not in self.known:
                self.known[digest] = (t.number, t.values[0] if len(t.values) == 1 else t.values,
                                      {k: t.user_attrs[k] for k in REUSED_ATTRS if k in t.user_attrs})

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        try:
            point = suggest_point(trial, self.recipe.search_space)
            config = self.recipe.compile(point)
            # what the point cannot hold (CycleQD: the mutated ancestors a child inherits)
            extend = getattr(trial.study.sampler, "extend_config", None)
            if extend is not None:
                config = extend(trial, config)
            digest = config_digest(config)
            trial.set_user_attr("config", config.to_yaml())
            trial.set_user_attr("config_digest", digest)
            if digest in self.known:
                number, value, attrs = self.known[digest]
                trial.set_user_attr("reused_from", number)
                set_attrs(trial, attrs)
                return value
            # first: references and anchors load sources into the resident model
            self.prepare_references()
            anchors = self.anchor_sets()
            t0 = time.perf_counter()
            model = self.merger.materialize(config)
            t1 = time.perf_counter()
            scores = staged_scores(self.recipe.evolve, self.evaluator, anchors, model, digest, trial)
            t2 = time.perf_counter()
            value = study_values(self.recipe.evolve, scores.values)  # weighted, or one per objective
            attrs = score_attrs(scores)
            set_attrs(trial, attrs)
            self.warn_unparsed(trial.number, scores)
            trial.set_user_attr("seconds", {"merge": round(t1 - t0, 4), "evaluate": round(t2 - t1, 4)})
            self.known[digest] = (trial.number, value, attrs)
            return value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as e:
            if interrupted(e):  # else the trial would fail as an error and the search go on past the Ctrl-C
                trial.set_user_attr("error", "interrupted")
                raise KeyboardInterrupt from None
            # the user's scoring code: its own file:line and error already make the line
            trial.set_user_attr("error", str(e) if isinstance(e, ObjectiveError) else f"{type(e).__name__}: {e}")
            self.log_failure(trial.number)
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    @staticmethod
    def warn_unparsed(number: int, scores: Scores) -> None:
        """A warning when a parsed judge gave unreadable replies (their count is kept with the trial)."""
        for name, (failed, total) in scores.unparsed.items():
            if failed:
                LOG.warning("trial %d: %s could not read a rating from %d of %d judge replies (each scored as its "
                            "unparsed_score; check the objective's pattern and rubric)",
                            number, name, failed, total)

    def log_failure(self, number: int) -> None:
        """The traceback of the exception being handled: to failures.log, and with -v to the console."""
        text = traceback.format_exc()
        TRACEBACKS.info("trial %d:\n%s", number, text)
        if self.failure_log is not None:
            with self.failure_log.open("a", encoding="utf-8") as f:
                f.write(f"--- trial {number} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{text}\n")
