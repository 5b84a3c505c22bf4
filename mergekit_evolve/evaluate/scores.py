"""What the study stores as a trial's value(s): the weighted objective, or one value per objective.

Single-objective studies maximise the weighted mean (minimised objectives sign-flipped);
``evolve.multi_objective`` studies get one direction per objective and the raw scores.
Every trial also keeps the per-objective scores in ``user_attrs["scores"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from mergekit_evolve.recipe.evolve_settings import EvolveSettings, Objective


@dataclass
class Scores:
    """Per-objective metric values of one model on one split; ``unparsed``: for an objective whose
    judge's replies are parsed, how many of its judgements gave no rating, of how many."""

    values: dict[str, float]
    unparsed: dict[str, tuple[int, int]] = field(default_factory=dict)

    def weighted(self, objectives: list[Objective]) -> float:
        """The weighted mean, sign-flipped for objectives to minimise, so higher is always better."""
        total = sum(o.weight for o in objectives)
        return sum(o.weight * o.sign * self.values[o.name] for o in objectives) / total


def directions(settings: EvolveSettings) -> list[str]:
    if settings.multi_objective:
        return [o.goal for o in settings.objectives]
    return ["maximize"]


def study_values(settings: EvolveSettings, scores: dict[str, float]) -> float | list[float]:
    """The value(s) ``Study.tell``/the objective returns for a candidate with these scores."""
    if settings.multi_objective:
        return [scores[o.name] for o in settings.objectives]
    return Scores(scores).weighted(settings.objectives)


def weighted(trial: FrozenTrial, objectives: list[Objective]) -> float | None:
    """A finished trial's weighted objective (higher is better); None unless it completed."""
    if trial.state != TrialState.COMPLETE:
        return None
    if len(trial.values) == 1:
        return trial.values[0]
    return Scores(trial.user_attrs["scores"]).weighted(objectives)


def qualities(trial: FrozenTrial, objectives: list[Objective]) -> dict[str, float] | None:
    """Per-objective scores of a completed trial, sign-flipped for 'minimize' so higher is better."""
    scores: dict[str, Any] = trial.user_attrs.get("scores") or {}
    if trial.state != TrialState.COMPLETE or any(o.name not in scores for o in objectives):
        return None
    return {o.name: o.sign * float(scores[o.name]) for o in objectives}
