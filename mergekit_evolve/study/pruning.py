"""Staged scoring: growing slices of the search split, an Optuna pruner deciding after each one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import transformers

from mergekit_evolve.evaluate.anchors import AnchorSet, choose_anchors
from mergekit_evolve.evaluate.lm_eval_suite import Scores, TaskSetupError
from mergekit_evolve.recipe.evolve_settings import EvolveSettings, PruningSettings

if TYPE_CHECKING:
    from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
}


def make_pruner(settings: PruningSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    try:
        return PRUNERS[settings.pruner](**settings.options)
    except TypeError as e:
        raise ValueError(f"evolve.pruning.options do not fit pruner '{settings.pruner}': {e}") from None


def _prunes(settings: EvolveSettings) -> bool:
    # Optuna cannot prune multi-objective trials (no intermediate values there).
    return settings.pruning.pruner != "none" and not getattr(settings, "multi_objective", False)


def anchor_sets(worker: Worker) -> dict[str, AnchorSet]:
    """Anchors per objective that asks for them, chosen once from the sources' per-example results."""
    if worker.anchors is not None:
        return worker.anchors
    from mergekit_evolve.compile import config_digest
    from mergekit_evolve.study.worker import source_config

    worker.anchors = {}
    for obj in worker.objectives:
        if not obj.anchors:
            continue
        plan = worker.evaluator.plan(obj, "search")
        if plan.ids is None or getattr(plan.aggregate, "__name__", "") != "mean":
            raise TaskSetupError(f"objective {obj.name}: anchors need a plain task with a mean-aggregated metric")
        key = f"{plan.metric},{plan.filter}"
        table = []
        for model in worker.sources:
            config = source_config(model, None)
            rows = worker.evaluator.rows(worker.merger.materialize(config), config_digest(config), plan, plan.ids)
            table.append([float(r[key]) for r in rows])
        worker.anchors[obj.name] = choose_anchors(np.array(table), plan.ids, obj.anchors, worker.recipe.evolve.seed)
        LOG.info("objective %s: %d anchor examples of %d", obj.name, len(worker.anchors[obj.name].ids), len(plan.ids))
    return worker.anchors


def staged_scores(worker: Worker, model: transformers.PreTrainedModel, digest: str, trial: optuna.Trial) -> Scores:
    settings = worker.recipe.evolve
    anchors = anchor_sets(worker)
    stages = settings.pruning.stages if _prunes(settings) else [1.0]
    wilcoxon = settings.pruning.pruner == "wilcoxon"
    reported: set[int] = set()
    for step, fraction in enumerate(stages):
        scores = worker.evaluator.score(model, "search", digest=digest, fraction=fraction, anchors=anchors)
        if fraction == 1.0:
            return scores
        if wilcoxon:
            _report_examples(worker, model, digest, trial, fraction, reported)
        else:
            trial.report(scores.weighted(worker.objectives), step)
        if trial.should_prune():
            trial.set_user_attr("scores", scores.values)
            trial.set_user_attr("pruned_at", fraction)
            raise optuna.TrialPruned(f"pruned after {fraction:.0%} of the search split")
    return scores


def _report_examples(worker: Worker, model: Any, digest: str, trial: optuna.Trial, fraction: float, reported: set[int]) -> None:
    """WilcoxonPruner compares per-example results: report each example's weighted value once."""
    import math

    total = sum(o.weight for o in worker.objectives)
    for k, obj in enumerate(worker.objectives):
        plan = worker.evaluator.plan(obj, "search")
        if plan.ids is None:
            continue
        ids = worker.evaluator.order(plan)[: max(1, math.ceil(len(plan.ids) * fraction))]
        sign = 1 if obj.goal == "maximize" else -1
        for doc_id, row in zip(ids, worker.evaluator.rows(model, digest, plan, ids)):
            step = k * 10_000_000 + doc_id
            if step not in reported:
                trial.report(sign * obj.weight / total * float(row[f"{plan.metric},{plan.filter}"]), step)
                reported.add(step)
