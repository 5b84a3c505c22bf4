"""lm-eval requests built once per document and replayed on every trial's weights.

``lm_eval.evaluator.evaluate`` rebuilds each task's requests (prompt rendering, few-shot
sampling, ``Instance`` objects) on every call, which on small models costs as much as the
forward passes. A search scores the same documents hundreds of times, so this keeps the
``Instance`` objects of every document it has built and runs a trial the way ``evaluate``
runs its model step: the requests of all tasks batched by request type into one call per
type, then each task's own filters and ``process_results`` per document.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mergekit_evolve.compat.lm_eval import set_task_instances

Row = dict[str, Any]


class PreparedRequests:
    """Per (task, document) the lm-eval ``Instance`` objects, built on first use."""

    def __init__(self, apply_chat_template: bool):
        self.apply_chat_template = apply_chat_template
        self._built: dict[tuple[str, int], list[Any]] = {}

    def _build(self, lm: Any, task_name: str, task: Any, ids: list[int]) -> None:
        missing = sorted(i for i in set(ids) if (task_name, i) not in self._built)
        if not missing:
            return
        task.build_all_requests(
            samples=missing, rank=0, world_size=1, apply_chat_template=self.apply_chat_template,
            chat_template=lm.apply_chat_template if self.apply_chat_template else None,
            tokenizer_name=lm.tokenizer_name if self.apply_chat_template else "",
        )
        by_position: dict[int, list[Any]] = defaultdict(list)
        for instance in task.instances:
            by_position[instance.doc_id].append(instance)
        # with ``samples``, lm-eval numbers documents by position in the (sorted) sample list
        for position, doc_id in enumerate(missing):
            self._built[(task_name, doc_id)] = sorted(by_position[position], key=lambda x: x.idx)

    def run(self, lm: Any, tasks: dict[str, Any], wanted: dict[str, list[int]]) -> dict[str, dict[int, Row]]:
        """Per task and document id, ``{"metric,filter": value}`` for the model ``lm`` holds now."""
        for name, ids in wanted.items():
            self._build(lm, name, tasks[name], ids)
        chosen = {name: {i: self._built[(name, i)] for i in ids} for name, ids in wanted.items()}
        by_type: dict[str, list[Any]] = defaultdict(list)
        for docs in chosen.values():
            for instances in docs.values():
                for instance in instances:
                    instance.resps, instance.filtered_resps = [], {}
                    by_type[instance.request_type].extend([instance] * instance.repeats)
        for request_type, requests in by_type.items():
            for response, request in zip(getattr(lm, request_type)(requests), requests, strict=True):
                request.resps.append(response)
        return {name: self._score(tasks[name], docs) for name, docs in chosen.items()}

    @staticmethod
    def _score(task: Any, docs: dict[int, list[Any]]) -> dict[int, Row]:
        # the task's filters read ``task.instances``: point it at this trial's requests
        set_task_instances(task, [instance for instances in docs.values() for instance in instances])
        task.apply_filters()
        rows: dict[int, Row] = {}
        for doc_id, instances in docs.items():
            row = rows.setdefault(doc_id, {})
            for filter_key in instances[0].filtered_resps:
                metrics = task.process_results(instances[0].doc, [x.filtered_resps[filter_key] for x in instances])
                row.update({f"{metric},{filter_key}": value for metric, value in metrics.items()})
        return rows
