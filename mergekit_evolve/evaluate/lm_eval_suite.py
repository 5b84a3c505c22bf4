"""lm-eval scoring of a resident model: tasks are built once per process, then reused every trial."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import transformers

from mergekit_evolve.recipe.evolve_settings import EvolveSettings, Objective

LOG = logging.getLogger(__name__)
Split = Literal["search", "heldout"]


class TaskSetupError(ValueError):
    pass


@dataclass
class Scores:
    """Per-objective metric values of one model on one split."""

    values: dict[str, float]

    def weighted(self, objectives: list[Objective]) -> float:
        """The weighted mean, sign-flipped for objectives to minimise, so higher is always better."""
        total = sum(o.weight for o in objectives)
        return sum(o.weight * (1 if o.goal == "maximize" else -1) * self.values[o.name] for o in objectives) / total


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


class TaskSuite:
    """The objectives' lm-eval tasks, indexed and loaded once.

    Custom task folders and the data paths inside their YAMLs are resolved relative to
    ``base_dir`` (the recipe's folder), so a recipe runs from any working directory.
    """

    def __init__(self, settings: EvolveSettings, base_dir: Path):
        _quiet_lm_eval()
        from lm_eval.tasks import TaskManager, get_task_dict

        self.settings = settings
        self.base_dir = base_dir
        paths = [str((base_dir / p).resolve()) for p in settings.task_paths]
        for p, raw in zip(paths, settings.task_paths):
            if not os.path.isdir(p):
                raise TaskSetupError(f"evolve.task_paths: no folder '{raw}' (looked at {p})")
        names = {o.task for o in settings.objectives} | {o.heldout_task for o in settings.objectives if o.heldout_task}
        manager = TaskManager(include_path=paths or None, include_defaults=False)
        if not names <= set(manager.all_tasks):
            # only index lm-eval's ~15k built-in tasks when the recipe needs one of them
            manager = TaskManager(include_path=paths or None, include_defaults=True)
        missing = sorted(names - set(manager.all_tasks))
        if missing:
            raise TaskSetupError(
                f"lm-eval cannot find task(s) {missing} in its registry"
                + (f" or in task_paths {settings.task_paths}" if paths else " (add task_paths for custom YAMLs)")
            )
        self.tasks: dict[str, Any] = {}
        with contextlib.chdir(base_dir):
            for name in sorted(names):
                try:
                    self.tasks[name] = get_task_dict([name], manager)
                except Exception as e:
                    raise TaskSetupError(f"lm-eval could not load task '{name}': {e}") from e
        for obj in settings.objectives:
            if obj.num_fewshot is not None:
                for task_name in filter(None, (obj.task, obj.heldout_task)):
                    for task in _leaf_tasks(self.tasks[task_name]):
                        task.set_config(key="num_fewshot", value=obj.num_fewshot)

    def task_for(self, objective: Objective, split: Split) -> tuple[str, Any]:
        if split == "search":
            return objective.task, objective.limit
        if not objective.heldout_task:
            return objective.task, objective.heldout_limit
        return objective.heldout_task, objective.heldout_limit


def _leaf_tasks(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaf_tasks(v)]
    return [] if tree is None else [tree]


class Evaluator:
    """Scores whatever weights the resident model holds right now."""

    def __init__(self, suite: TaskSuite, tokenizer: transformers.PreTrainedTokenizerBase):
        self.suite = suite
        self.tokenizer = tokenizer
        self._lms: dict[int, Any] = {}

    def _lm(self, model: transformers.PreTrainedModel) -> Any:
        from lm_eval.models.huggingface import HFLM

        lm = self._lms.get(id(model))
        if lm is None:
            lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.suite.settings.batch_size,
                device=str(model.device),
            )
            self._lms[id(model)] = lm
        return lm

    def score(self, model: transformers.PreTrainedModel, split: Split = "search") -> Scores:
        from lm_eval.evaluator import evaluate

        lm = self._lm(model)
        values: dict[str, float] = {}
        for obj in self.suite.settings.objectives:
            task, limit = self.suite.task_for(obj, split)
            results = evaluate(
                lm,
                self.suite.tasks[task],
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self.suite.settings.apply_chat_template,
                verbosity="WARNING",
            )["results"]
            row = results.get(task, {})
            if obj.metric not in row:
                keys = sorted(k for k in row if "," in k and not k.endswith("_stderr"))
                raise TaskSetupError(f"task '{task}' reports no metric '{obj.metric}'; it reports {keys}")
            value = float(row[obj.metric])
            if math.isnan(value):
                raise ValueError(f"task '{task}' scored NaN for '{obj.metric}'")
            values[obj.name] = value
        return Scores(values)
