"""Multi-objective runs: the Pareto front (``pareto.json``, ``plots/pareto.png``) and the rule that picks ``best/``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from mergekit_evolve.evaluate.scores import weighted
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.runfolder import RunFolder

LOG = logging.getLogger(__name__)


def weighted_target(settings: EvolveSettings) -> Callable[[FrozenTrial], float]:
    """A trial's weighted objective, for plots of a multi-objective study."""
    return lambda trial: weighted(trial, settings.objectives)  # type: ignore[return-value]


def _meets(trial: FrozenTrial, settings: EvolveSettings) -> bool:
    scores = trial.user_attrs["scores"]
    rule = settings.select
    return all(scores[settings.objective_named(n).name] >= v for n, v in rule.at_least.items()) and all(
        scores[settings.objective_named(n).name] <= v for n, v in rule.at_most.items()
    )


def _rank(trial: FrozenTrial, settings: EvolveSettings) -> float:
    if settings.select.objective:
        objective = settings.objective_named(settings.select.objective)
        return objective.sign * trial.user_attrs["scores"][objective.name]
    return weighted(trial, settings.objectives)  # type: ignore[return-value]


def select_trial(study: optuna.Study, settings: EvolveSettings) -> FrozenTrial:
    """The study's best trial; in a multi-objective study, the Pareto trial ``evolve.select`` names."""
    if len(study.directions) == 1:
        return study.best_trial
    front = study.best_trials
    eligible = [t for t in front if _meets(t, settings)]
    if not eligible:
        LOG.warning(
            "no Pareto trial meets evolve.select's bounds (at_least %s, at_most %s); choosing among all %d",
            settings.select.at_least, settings.select.at_most, len(front),
        )
        eligible = front
    return max(eligible, key=lambda t: (_rank(t, settings), -t.number))


def describe_rule(settings: EvolveSettings) -> str:
    rule = settings.select
    text = f"highest {rule.objective}" if rule.objective else "highest weighted objective"
    bounds = [f"{n} >= {v:g}" for n, v in rule.at_least.items()] + [f"{n} <= {v:g}" for n, v in rule.at_most.items()]
    return text + (f" among trials with {' and '.join(bounds)}" if bounds else "")


def write_pareto(run_dir: Path, study: optuna.Study, settings: EvolveSettings, selected: FrozenTrial) -> dict[str, Any]:
    """``pareto.json``: every Pareto trial with its scores; ``plots/pareto.png``."""
    rows = [
        {
            "trial": t.number,
            "scores": {o.name: t.user_attrs["scores"][o.name] for o in settings.objectives},
            "weighted": weighted(t, settings.objectives),
            "meets_bounds": _meets(t, settings),
            "point": t.params,
        }
        for t in sorted(study.best_trials, key=lambda t: t.number)
    ]
    data = {
        "objectives": [{"name": o.name, "goal": o.goal, "weight": o.weight} for o in settings.objectives],
        "rule": describe_rule(settings),
        "selected": selected.number,
        "front": rows,
    }
    RunFolder(run_dir).pareto.write_text(json.dumps(data, indent=2), encoding="utf-8")
    plot_pareto(run_dir, study, settings)
    return data


def plot_pareto(run_dir: Path, study: optuna.Study, settings: EvolveSettings) -> Path:
    import matplotlib  # imported on use: pyplot must see the Agg backend before it loads (no display needed)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    names = [o.name for o in settings.objectives]
    if len(names) > 3:
        LOG.info("plots/pareto.png shows the first three of %d objectives", len(names))
        ax = plot_pareto_front(study, targets=lambda t: tuple(t.values[:3]), target_names=names[:3])
    else:
        ax = plot_pareto_front(study, target_names=names)
    out = RunFolder(run_dir).plots["pareto"]
    out.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.set_size_inches(7, 5.5)
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=110)
    plt.close(ax.figure)
    return out
