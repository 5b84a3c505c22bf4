"""What an lm-eval task's own config says about it (dataset, split, metrics, few-shot), without loading its data."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

LOG = logging.getLogger(__name__)
SPLITS = ("test_split", "validation_split", "training_split")  # the split lm-eval scores, in its own order
LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow"}  # `datasets` builders that read local files


@dataclass(frozen=True)
class TaskFacts:
    task: str
    dataset: str | None = None  # Hub dataset id; None for local data files
    subset: str | None = None
    split: str | None = None
    num_fewshot: int = 0
    metrics: list[str] = field(default_factory=list)


def task_facts(names: set[str], task_paths: list[Path]) -> dict[str, TaskFacts]:
    """Facts about each named task from its YAML (includes resolved); a task lm-eval cannot index is left out."""
    return _task_facts(frozenset(names), tuple(str(p) for p in task_paths if p.is_dir()))


@lru_cache(maxsize=8)  # indexing lm-eval's built-in tasks takes seconds; the card and the Space ask alike
def _task_facts(names: frozenset[str], task_paths: tuple[str, ...]) -> dict[str, TaskFacts]:
    paths = list(task_paths) or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not names <= set(manager.all_tasks):  # lm-eval's ~15k built-in tasks only when one is needed
        manager = TaskManager(include_path=paths, include_defaults=True)
    found = {}
    for name in sorted(names):
        entry = manager.task_index.get(name)
        if entry is None or not isinstance(entry.cfg, dict):
            LOG.warning("lm-eval has no config for task %s: the card names it without its dataset", name)
            continue
        found[name] = _facts(name, entry.cfg)
    return found


def _facts(name: str, cfg: dict[str, Any]) -> TaskFacts:
    path = cfg.get("dataset_path")
    local = not path or path in LOCAL_LOADERS or os.path.isabs(path) or path.startswith(".")
    split = next((cfg[key] for key in SPLITS if cfg.get(key)), None)
    metrics = [m["metric"] for m in cfg.get("metric_list") or []
               if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    return TaskFacts(
        task=name,
        dataset=None if local else path,
        subset=None if local else cfg.get("dataset_name"),
        split=split,
        num_fewshot=int(cfg.get("num_fewshot") or 0),
        metrics=metrics,
    )
