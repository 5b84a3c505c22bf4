"""Staged scoring: growing slices of the search split, an Optuna pruner deciding after each one."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna
import transformers

from mergekit_evolve.evaluate.anchors import AnchorSet
from mergekit_evolve.evaluate.scores import Scores
from mergekit_evolve.evaluate.suite import Evaluator
from mergekit_evolve.recipe.evolve_settings import EvolveSettings, PruningSettings

LOG = logging.getLogger(__name__)
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
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


@dataclass
class Rung:
    """One scoring step: the first ``fraction`` of the search split, or the anchors where given."""

    fraction: float
    anchors: dict[str, AnchorSet] | None = None

    @property
    def label(self) -> str:
        return "the anchor examples" if self.anchors else f"{self.fraction:.0%} of the search split"


def rungs(settings: EvolveSettings, anchors: dict[str, AnchorSet]) -> tuple[int, list[Rung]]:
    """The first step number and the rungs a candidate climbs; the last one gives its value.

    Without a pruner: one rung, the anchor estimate (when objectives have anchors) or the whole
    split. With one, anchors are the first rung (objectives without anchors score the first
    slice there), then the slices, ending with the whole split. That rung is step 1, not 0:
    successive halving's first rung is at step ``min_resource`` >= 1 and never prunes at step 0.
    """
    if settings.pruning.pruner == "none":
        return 0, [Rung(1.0, anchors or None)]
    stages = [Rung(f) for f in settings.pruning.stages]
    if not anchors:
        return 0, stages
    return 1, [Rung(stages[0].fraction, anchors), *stages]


def staged_scores(settings: EvolveSettings, evaluator: Evaluator, anchors: dict[str, AnchorSet],
                  model: transformers.PreTrainedModel, digest: str, trial: optuna.Trial) -> Scores:
    """The candidate's search score, climbing the rungs; raises TrialPruned where the pruner stops it."""
    first, ladder = rungs(settings, anchors)
    wilcoxon = settings.pruning.pruner == "wilcoxon"
    reported: set[int] = set()
    *climbed, last = ladder
    for step, rung in enumerate(climbed, start=first):
        scores = evaluator.score(model, "search", digest=digest, fraction=rung.fraction, anchors=rung.anchors)
        if wilcoxon:
            _report_examples(settings, evaluator, model, digest, trial, rung, reported)
        else:
            trial.report(scores.weighted(settings.objectives), step)
        if trial.should_prune():
            trial.set_user_attr("scores", scores.values)
            trial.set_user_attr("pruned_at", "anchors" if rung.anchors else rung.fraction)
            raise optuna.TrialPruned(f"pruned after {rung.label}")
    return evaluator.score(model, "search", digest=digest, fraction=last.fraction, anchors=last.anchors)


def _report_examples(settings: EvolveSettings, evaluator: Evaluator, model: Any, digest: str, trial: optuna.Trial,
                     rung: Rung, reported: set[int]) -> None:
    """WilcoxonPruner compares per-example results: report each example's weighted value once."""
    total = sum(o.weight for o in settings.objectives)
    for k, obj in enumerate(settings.objectives):
        plan = evaluator.plan(obj, "search")
        if plan.ids is None:
            continue
        ids = evaluator.example_ids(obj, plan, rung.fraction, rung.anchors)
        for doc_id, row in zip(ids, evaluator.rows(model, digest, plan, ids), strict=False):
            step = k * 10_000_000 + doc_id
            if step not in reported:
                trial.report(obj.sign * obj.weight / total * float(row[f"{plan.metric},{plan.filter}"]), step)
                reported.add(step)
