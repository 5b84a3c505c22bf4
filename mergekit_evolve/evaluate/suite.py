"""lm-eval scoring of a resident model: tasks are built once per process, then reused every trial."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict

from mergekit_evolve.compat.lm_eval import HookedHFLM, compiled_templates
from mergekit_evolve.evaluate import generation, loglikelihood
from mergekit_evolve.evaluate.example_objectives import (
    ExampleScorer,
    Split,
    TaskSetupError,
    file_digest,
    limited,
    mean,
)
from mergekit_evolve.evaluate.example_store import ExampleStore
from mergekit_evolve.evaluate.judge import JudgeScorer
from mergekit_evolve.evaluate.python_objectives import PythonScorer
from mergekit_evolve.evaluate.requests import PreparedRequests
from mergekit_evolve.evaluate.reward import RewardScorer
from mergekit_evolve.evaluate.scores import Scores
from mergekit_evolve.recipe.evolve_settings import (
    EvolveSettings,
    ExampleObjective,
    JudgeObjective,
    Objective,
    PythonObjective,
    RewardObjective,
    TaskObjective,
)

LOG = logging.getLogger(__name__)
SCORERS: dict[type[ExampleObjective], type[ExampleScorer]] = {
    PythonObjective: PythonScorer, RewardObjective: RewardScorer, JudgeObjective: JudgeScorer,
}


def make_scorer(objective: ExampleObjective, settings: EvolveSettings, base_dir: Path) -> ExampleScorer:
    """The scorer of an objective that is not an lm-eval task (its data read, its function imported)."""
    return SCORERS[type(objective)](objective, base_dir, settings.apply_chat_template)


def _quiet_lm_eval() -> None:
    # lm-eval warns on every HFLM over a model object that it ignores loading arguments: expected here
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.ERROR))


def task_objectives(settings: EvolveSettings) -> list[TaskObjective]:
    return [o for o in settings.objectives if isinstance(o, TaskObjective)]


def objective_tasks(settings: EvolveSettings) -> set[str]:
    objectives = task_objectives(settings)
    return {o.task for o in objectives} | {o.heldout_task for o in objectives if o.heldout_task}


def task_manager(settings: EvolveSettings, base_dir: Path) -> TaskManager:
    """lm-eval's index of the objectives' tasks: the recipe's task folders, and lm-eval's own tasks
    only when the recipe names one of them (indexing its ~15k tasks takes many seconds)."""
    paths = [str((base_dir / p).resolve()) for p in settings.task_paths]
    for p, raw in zip(paths, settings.task_paths, strict=False):
        if not os.path.isdir(p):
            raise TaskSetupError(f"evolve.task_paths: no folder '{raw}' (looked at {p})", field="task_paths")
    names = objective_tasks(settings)
    # keyed by the folders' YAML files and their times, so an edited task is indexed again
    key = tuple((p, tuple(sorted((str(f), f.stat().st_mtime_ns) for f in Path(p).rglob("*.yaml")))) for p in paths)
    manager = _index(key, False)
    if not names <= set(manager.all_tasks):
        manager = _index(key, True)
    missing = sorted(names - set(manager.all_tasks))
    if missing:
        raise TaskSetupError(
            f"lm-eval cannot find task(s) {missing} in its registry"
            + (f" or in task_paths {settings.task_paths}" if paths else " (add task_paths for custom YAMLs)"),
            task=missing[0],
        )
    return manager


@functools.lru_cache(maxsize=8)
def _index(key: tuple[tuple[str, Any], ...], defaults: bool) -> TaskManager:
    # once per process: the checks before the search, then the run loads its tasks from the same index
    return TaskManager(include_path=[p for p, _ in key] or None, include_defaults=defaults)


# metrics lm-eval gives a task without a metric_list, by output type
DEFAULT_METRICS = {
    "loglikelihood": {"perplexity", "acc"},
    "multiple_choice": {"acc", "acc_norm", "acc_mutual_info"},
    "generate_until": {"exact_match"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}


def check_indexed(objective: TaskObjective, manager: TaskManager) -> None:
    """The objective's metric and filter exist in its tasks' configs, as lm-eval indexed them (no data loaded).

    Groups and tags aggregate their tasks' metrics: those are checked once loaded (``TaskSuite.check``)."""
    metric, _, flt = objective.metric.partition(",")
    flt = flt or "none"
    for name in filter(None, (objective.task, objective.heldout_task)):
        cfg = getattr(manager.task_index.get(name), "cfg", None)
        if not isinstance(cfg, dict) or "task" not in cfg or cfg.get("task") != name:
            continue
        listed = cfg.get("metric_list")
        metrics = {m["metric"] for m in listed if isinstance(m.get("metric"), str)} if listed else \
            DEFAULT_METRICS.get(cfg.get("output_type", "generate_until"), set())
        if metrics and metric not in metrics:
            raise TaskSetupError(f"task '{name}' has no metric '{metric}'; it has {sorted(metrics)}", name, "metric")
        filters = {f.get("name", "none") for f in cfg.get("filter_list") or [{"name": "none"}]}
        if flt not in filters:
            raise TaskSetupError(f"task '{name}' has no filter '{flt}' (metric '{objective.metric}'); it has "
                                 f"{sorted(filters)}", name, "metric")


class TaskSuite:
    """The objectives' lm-eval tasks, indexed and loaded once, and the scorers of the other objectives.

    Custom task folders and the data paths inside their YAMLs are resolved relative to
    ``base_dir`` (the recipe's folder), so a recipe runs from any working directory.
    """

    def __init__(self, settings: EvolveSettings, base_dir: Path):
        _quiet_lm_eval()
        self.settings = settings
        self.base_dir = base_dir
        manager = task_manager(settings, base_dir)
        names = objective_tasks(settings)
        self.manager = manager
        self.tasks: dict[str, Any] = {}
        with contextlib.chdir(base_dir):
            for name in sorted(names):
                try:
                    self.tasks[name] = get_task_dict([name], manager)
                except Exception as e:
                    raise TaskSetupError(f"lm-eval could not load task '{name}': {type(e).__name__}: {e}",
                                         task=name) from e
        unsafe = sorted(t.config.task for tree in self.tasks.values() for t in _leaf_tasks(tree)
                        if getattr(t, "UNSAFE_CODE", False))
        if unsafe:  # lm-eval runs these only when confirmed; a search would run them unattended
            raise TaskSetupError(f"task(s) {unsafe} execute model-written code; mergekit-evolve does not run them",
                                 task=unsafe[0])
        self.scorers = {o.name: make_scorer(o, settings, base_dir) for o in settings.objectives
                        if isinstance(o, ExampleObjective)}
        for obj in task_objectives(settings):
            if obj.num_fewshot is not None:
                for task_name in filter(None, (obj.task, obj.heldout_task)):
                    for task in _leaf_tasks(self.tasks[task_name]):
                        task.set_config(key="num_fewshot", value=obj.num_fewshot)

    def example_prompts(self, per_task: int = 1, max_chars: int = 400) -> list[str]:
        """The first prompt(s) of each objective's search data: a task's as lm-eval renders them (no few-shot
        context), another kind's ``prompt`` field where its examples have one."""
        prompts: list[str] = []
        with contextlib.chdir(self.base_dir):
            for scorer in self.scorers.values():  # a reward model's prompts
                for example in scorer.split_examples("search")[:per_task]:
                    prompt = example.get("prompt")
                    if isinstance(prompt, str) and prompt.strip() and prompt.strip() not in prompts:
                        prompts.append(prompt.strip()[:max_chars])
            for obj in task_objectives(self.settings):
                for task in _leaf_tasks(self.tasks[obj.task])[:1]:
                    for doc in list(task.eval_docs)[:per_task]:
                        text = task.doc_to_text(doc)
                        if isinstance(text, str) and text.strip() and text.strip() not in prompts:
                            prompts.append(text.strip()[:max_chars])
        return prompts

    def files(self) -> dict[str, str]:
        """Every task YAML and local data file the objectives read (and the other objectives' code, data and
        reward models) -> a hash of its content, so a resumed run can tell that one changed (built-in
        tasks' hub data is not covered)."""
        paths: set[Path] = {p for scorer in self.scorers.values() for p in scorer.files()}
        leaves = [t for tree in self.tasks.values() for t in _leaf_tasks(tree)]
        for name in {*self.tasks, *(t.config.task for t in leaves)}:
            entry = self.manager.task_index.get(name)
            if entry is not None and getattr(entry, "yaml_path", None):
                paths |= _yaml_closure(Path(entry.yaml_path))
        for task in leaves:
            data = (task.config.dataset_kwargs or {}).get("data_files")
            values = data.values() if isinstance(data, dict) else [data] if isinstance(data, str) else data or []
            for value in values:
                for item in [value] if isinstance(value, str) else value:
                    path = (self.base_dir / item).resolve()
                    if path.is_file():
                        paths.add(path)
        # named relative to the recipe's folder where they sit under it, so a run folder restored
        # into another checkout (a CI artifact) still matches its own task files
        base = self.base_dir.resolve()
        return {str(p.relative_to(base)) if p.is_relative_to(base) else str(p): file_digest(p) for p in sorted(paths)}

    def check(self, objective: Objective) -> None:
        """The objective's metric and filter exist in each of its tasks, and each split has examples
        (another kind's own checks: its data was read when the suite was built)."""
        if isinstance(objective, ExampleObjective):
            self.scorers[objective.name].check()
            return
        metric, _, flt = objective.metric.partition(",")
        flt = flt or "none"
        for split, field in (("search", "task"), ("heldout", "heldout_task" if objective.heldout_task else "task")):
            name, _ = self.task_for(objective, split)
            leaves = _leaf_tasks(self.tasks[name])
            for task in leaves:
                if not len(task.eval_docs):
                    raise TaskSetupError(f"task '{task.config.task}' has no examples in its evaluation split",
                                         name, field)
            metrics = {m for task in leaves for m in task.aggregation()}
            if metric not in metrics:
                raise TaskSetupError(f"task '{name}' has no metric '{metric}'; it has {sorted(metrics)}",
                                     name, "metric")
            filters = {f.get("name", "none") for task in leaves
                       for f in (task.config.filter_list or [{"name": "none"}])}
            if flt not in filters:
                raise TaskSetupError(f"task '{name}' has no filter '{flt}' (metric '{objective.metric}'); it has "
                                     f"{sorted(filters)}", name, "metric")

    def task_for(self, objective: TaskObjective, split: Split) -> tuple[str, Any]:
        if split == "search":
            return objective.task, objective.limit
        if not objective.heldout_task:
            return objective.task, objective.heldout_limit
        return objective.heldout_task, objective.heldout_limit


# what a task YAML pulls in from beside itself: lm-eval's `include:` and `!function module.name` helpers
_INCLUDE = re.compile(r"^include:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)
_FUNCTION = re.compile(r"!function\s+([\w.]+)\.\w+")


def _yaml_closure(path: Path) -> set[Path]:
    """A task YAML and the files it includes and the Python helpers it names, transitively."""
    found: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in found or not current.is_file():
            continue
        found.add(current)
        if current.suffix not in (".yaml", ".yml"):
            continue
        text = current.read_text(encoding="utf-8", errors="replace")
        todo += [(current.parent / name).resolve() for name in _INCLUDE.findall(text)]
        todo += [(current.parent / (module.replace(".", "/") + ".py")).resolve() for module in _FUNCTION.findall(text)]
    return found


def _leaf_tasks(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaf_tasks(v)]
    return [] if tree is None else [tree]


class QuietHFLM(HookedHFLM):
    """lm-eval's ``HFLM`` without its per-call progress bars (the search draws one bar of its own),
    with tokenised pairs remembered, the batched loglikelihood of ``loglikelihood.py`` and the
    greedy decoding loop of ``generation.py``."""

    @functools.cached_property
    def max_length(self) -> int:
        # HFLM re-derives it from the model config three times a request; the resident
        # model's config never changes under one HFLM
        return HFLM.max_length.fget(self)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # the same prompts are tokenised every trial: once per process is enough
        memo = self.__dict__.setdefault("pair_memo", {})
        key = (context, continuation)
        if key not in memo:
            memo[key] = super().encode_pair(context, continuation)
        return memo[key]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_tokens(self, requests, override_bs: int | None = None):
        if loglikelihood.applies(self, override_bs):
            return loglikelihood.loglikelihood_tokens(self, requests)
        return super().loglikelihood_tokens(requests, override_bs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if generation.applies(self, requests):
            return generation.generate_until(self, requests)
        return super().generate_until(requests, disable_tqdm=True)


@dataclass
class EvalPlan:
    """Which documents of which task an objective scores on one split, and how to aggregate them.

    For an objective that is not an lm-eval task, ``task`` is its scorer's store key and ``scorer`` is set."""

    task: str
    ids: list[int] | None  # None: a group task, scored whole through lm-eval's ``limit``
    limit: Any
    metric: str
    filter: str
    aggregate: Any
    scorer: ExampleScorer | None = None
    split: Split = "search"

    def value(self, rows: list[dict[str, Any]]) -> float:
        return float(self.aggregate([r[f"{self.metric},{self.filter}"] for r in rows]))


class Evaluator:
    """Scores whatever weights the resident model holds right now.

    Plain tasks are scored example by example through lm-eval's ``samples=`` selection, so
    per-example results can be stored (and never recomputed for the same config) and a
    candidate can be scored on a growing slice of the split; the aggregate is lm-eval's own
    aggregation function, so a whole split scores exactly as ``limit`` would.
    """

    def __init__(self, suite: TaskSuite, tokenizer: transformers.PreTrainedTokenizerBase,
                 store: ExampleStore | None = None):
        self.suite = suite
        self.tokenizer = tokenizer
        self.store = store or ExampleStore()
        self._lms: dict[int, Any] = {}
        self.computed = 0  # examples actually run through the model (for the benchmark)
        self._plans: dict[tuple[str, Split], EvalPlan] = {}
        self._files: dict[str, str] | None = None  # the task files' hashes, read on first use
        self.requests = PreparedRequests(suite.settings.apply_chat_template)

    def _lm(self, model: transformers.PreTrainedModel) -> Any:
        lm = self._lms.get(id(model))
        if lm is None:
            lm = QuietHFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.suite.settings.batch_size,
                device=str(model.device),
            )
            self._lms[id(model)] = lm
        return lm

    def plan(self, objective: Objective, split: Split) -> EvalPlan:
        key = (objective.name, split)
        if key not in self._plans and isinstance(objective, ExampleObjective):
            scorer = self.suite.scorers[objective.name]
            limit = objective.limit if split == "search" else objective.heldout_limit
            n = limited(len(scorer.split_examples(split)), limit)
            metric, _, flt = objective.metric.partition(",")
            self._plans[key] = EvalPlan(scorer.store_key(split), list(range(n)), limit, metric, flt, mean, scorer,
                                        split)
        if key not in self._plans:
            name, limit = self.suite.task_for(objective, split)
            metric, _, flt = objective.metric.partition(",")
            tree = self.suite.tasks[name]
            task = tree.get(name) if isinstance(tree, dict) else None
            if task is None or isinstance(task, dict) or not hasattr(task, "eval_docs"):
                self._plans[key] = EvalPlan(name, None, limit, metric, flt, None)
            else:
                n = limited(len(task.eval_docs), limit)
                aggregate = task.aggregation().get(metric)
                if aggregate is None:
                    raise TaskSetupError(f"task '{name}' has no metric '{metric}'; it has {sorted(task.aggregation())}")
                self._plans[key] = EvalPlan(name, list(range(n)), limit, metric, flt or "none", aggregate)
        return self._plans[key]

    def score_facts(self, objective: Objective, split: Split) -> str:
        """A digest of what a whole-split score of ``objective`` depends on besides the model: the
        task and its limit, metric, few-shot count (another kind: its settings), chat template, and
        the task files' content."""
        if self._files is None:
            self._files = self.suite.files()
        facts: dict[str, Any] = {"chat": self.suite.settings.apply_chat_template, "files": self._files}
        if isinstance(objective, ExampleObjective):  # its data, scorer and settings are all in the objective
            facts |= {"objective": objective.model_dump(mode="json"), "split": split}
        else:
            task, limit = self.suite.task_for(objective, split)
            facts |= {"task": task, "limit": limit, "metric": objective.metric, "num_fewshot": objective.num_fewshot}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def rows(self, model: transformers.PreTrainedModel, digest: str, plan: EvalPlan,
             ids: list[int]) -> list[dict[str, Any]]:
        """Per-example metrics for ``ids``: from the store, else computed now and stored."""
        return self.rows_many(model, digest, [(plan, ids)])[0]

    def rows_many(
        self, model: transformers.PreTrainedModel, digest: str | None, wanted: list[tuple[EvalPlan, list[int]]]
    ) -> list[list[dict[str, Any]]]:
        """``rows`` for several tasks at once: whatever the store lacks runs as one request set,
        batched across tasks (see ``PreparedRequests``); other objectives' scorers run after it.
        Without a ``digest`` (a model that is no config) nothing is read from or kept in the store."""
        have = {plan.task: self.store.get(digest, plan.task, ids) if digest else {} for plan, ids in wanted}
        missing: dict[str, list[int]] = {}
        for plan, ids in wanted:
            need = [i for i in ids if i not in have[plan.task]]
            if need:
                missing[plan.task] = sorted(set(missing.get(plan.task, [])) | set(need))
        scorers = {plan.task: plan for plan, _ in wanted if plan.scorer is not None and plan.task in missing}
        for key, plan in scorers.items():
            assert plan.scorer is not None
            new = plan.scorer.rows(model, self.tokenizer, plan.split, missing.pop(key))
            if digest:
                self.store.put(digest, {key: new})
            self.computed += len(new)
            have[key].update(new)
        if missing:
            tasks = {name: task for t in missing for name, task in self.suite.tasks[t].items()}
            with compiled_templates():
                computed = self.requests.run(self._lm(model), tasks, missing)
            self.store.put(digest, computed)
            for task_name, new in computed.items():
                self.computed += len(new)
                have[task_name].update(new)
        return [[have[plan.task][i] for i in ids] for plan, ids in wanted]

    def _whole(self, model: transformers.PreTrainedModel, plan: EvalPlan, objective: Objective) -> float:
        with compiled_templates():
            results = evaluate(
                self._lm(model), self.suite.tasks[plan.task], limit=plan.limit, bootstrap_iters=0, log_samples=False,
                apply_chat_template=self.suite.settings.apply_chat_template, verbosity="WARNING",
            )["results"]
        row = results.get(plan.task, {})
        if objective.metric not in row:
            keys = sorted(k for k in row if "," in k and not k.endswith("_stderr"))
            raise TaskSetupError(f"task '{plan.task}' reports no metric '{objective.metric}'; it reports {keys}")
        return float(row[objective.metric])

    def score(
        self, model: transformers.PreTrainedModel, split: Split = "search", digest: str | None = None,
        fraction: float = 1.0, anchors: dict[str, Any] | None = None,
    ) -> Scores:
        """Scores on the first ``fraction`` of each objective's (shuffled) split.

        ``anchors`` maps an objective name to an ``AnchorSet``; those objectives are estimated
        from their anchor examples instead.
        """
        objectives = self.suite.settings.objectives
        plans = [self.plan(obj, split) for obj in objectives]
        wanted: dict[str, tuple[EvalPlan, list[int]]] = {}
        for obj, plan in zip(objectives, plans, strict=False):
            if plan.ids is None or (digest is None and plan.scorer is None):
                continue
            wanted[obj.name] = (plan, self.example_ids(obj, plan, fraction, anchors))
        rows = dict(zip(wanted, self.rows_many(model, digest, list(wanted.values())), strict=False)) if wanted else {}
        values: dict[str, float] = {}
        unparsed: dict[str, tuple[int, int]] = {}
        for obj, plan in zip(objectives, plans, strict=False):
            if plan.scorer is not None and obj.name in rows and (count := plan.scorer.unparsed(rows[obj.name])):
                unparsed[obj.name] = count
            if obj.name not in rows:
                value = self._whole(model, plan, obj)
            elif anchors and obj.name in anchors:
                value = anchors[obj.name].estimate(rows[obj.name], plan)
            else:
                value = plan.value(rows[obj.name])
            if math.isnan(value):
                raise ValueError(f"task '{plan.task}' scored NaN for '{obj.metric}'")
            values[obj.name] = value
        return Scores(values, unparsed)

    def example_ids(self, objective: Objective, plan: EvalPlan, fraction: float,
                    anchors: dict[str, Any] | None) -> list[int]:
        """The examples ``score`` runs for a plain task: its anchors, else the first ``fraction`` of the shuffle."""
        if anchors and objective.name in anchors:
            return anchors[objective.name].ids
        return self.order(plan)[: max(1, math.ceil(len(plan.ids or []) * fraction))]

    def order(self, plan: EvalPlan) -> list[int]:
        """A fixed shuffle of the split, so every slice is a fair sample of it."""
        ids = list(plan.ids or [])
        random.Random(f"{self.suite.settings.seed}/{plan.task}").shuffle(ids)
        return ids
