"""The winner of a search whose trial values are anchor estimates: the best estimates, re-scored in full.

With anchor estimates the highest estimate is partly luck: the candidates the search ranks
first are disproportionately the ones its few anchors flattered. The top ``evolve.finalists``
distinct configs are therefore scored on the whole search split (examples they already ran
are reused from the store) and the best full score wins. The held-out split stays unseen.
With a pruner, anchors are only its first rung and completed trials hold full scores: the
study's best trial wins as it is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergekit_evolve.report.winner import winner_config

if TYPE_CHECKING:
    from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)


def best_of_finalists(study: optuna.Study, worker: Worker) -> FrozenTrial:
    """The study's best trial, or, when its values are anchor estimates, the finalist whose
    full search-split score is highest."""
    if not worker.recipe.evolve.estimated:
        return study.best_trial
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    ranked = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: (-sign * t.value, t.number))
    finalists: dict[str, FrozenTrial] = {}
    for trial in ranked:
        finalists.setdefault(trial.user_attrs.get("config_digest", str(trial.number)), trial)
        if len(finalists) == worker.recipe.evolve.finalists:
            break
    tied = {t.user_attrs.get("config_digest", str(t.number)) for t in ranked if t.value == ranked[0].value}
    if len(tied) > len(finalists):
        # on right-or-wrong tasks a few anchors plateau: the search stops telling its best candidates apart
        LOG.warning(
            "%d distinct candidates tie at the best anchor estimate (%.4f) and only the first %d are re-scored: the "
            "anchors no longer tell the best candidates apart; use more anchors, a pruner (anchors as its first "
            "rung), or more finalists (evolve.finalists)", len(tied), ranked[0].value, len(finalists))
    full = {t.number: worker.score_config(winner_config(t), "search").weighted(worker.objectives)
            for t in finalists.values()}
    best = max(finalists.values(), key=lambda t: (full[t.number], -t.number))
    LOG.info(
        "anchor estimates: re-scored the best %d trials on the whole search split; trial %d wins (%.4f; estimate %.4f)",
        len(finalists), best.number, full[best.number], best.value,
    )
    return best
