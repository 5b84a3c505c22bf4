"""Anchor examples: estimate a split's score from a few representative examples.

As in tinyBenchmarks, examples are clustered by how the source models did on them (their
per-example results on the search split); the example nearest each cluster's centre is an
anchor, weighted by its cluster's share of the split. A candidate's estimate is the weighted
mean of its anchor results. Only for metrics lm-eval aggregates by a mean.

tinyBenchmarks clusters the results of hundreds of models; a merge has two to a few sources, and
on a right-or-wrong task they tell at most ``2 ** sources`` groups of examples apart (three
sources where only one expert scores: two groups). One anchor a group would then estimate a
split from two examples, one of them carrying three quarters of the weight. So the anchors asked
for are shared out over the groups in proportion to their size (D'Hondt: one each, then each next
anchor to the group with the most examples per anchor), a group's anchors being the members
nearest its centre (ties, identical members, broken by the seed) and sharing its weight. With as
many groups as anchors this is tinyBenchmarks' choice exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class AnchorSet:
    ids: list[int]
    weights: list[float]

    def estimate(self, rows: list[dict[str, Any]], plan: Any) -> float:
        key = f"{plan.metric},{plan.filter}"
        return float(sum(w * float(r[key]) for w, r in zip(self.weights, rows, strict=False)))


def choose_anchors(results: np.ndarray, ids: list[int], size: int, seed: int) -> AnchorSet:
    """``results[s, e]``: source s's metric on example ``ids[e]``."""
    from sklearn.cluster import (
        KMeans,  # imported on use: scikit-learn takes a second to import, and anchors are opt-in
    )

    points = results.T.astype(float)
    size = min(size, len(ids))
    # no more clusters than distinct points: k-means would leave the rest empty, and warn
    k = min(size, len(np.unique(points, axis=0)))
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(points)
    groups = [np.flatnonzero(km.labels_ == c) for c in range(k)]
    picks = [1] * k
    for _ in range(size - k):
        c = max((c for c in range(k) if picks[c] < len(groups[c])), key=lambda c: len(groups[c]) / picks[c])
        picks[c] += 1
    tiebreak = np.random.default_rng(seed).random(len(ids))
    anchors, weights = [], []
    for c, members in enumerate(groups):
        distance = ((points[members] - km.cluster_centers_[c]) ** 2).sum(axis=1)
        for member in members[np.lexsort((tiebreak[members], distance))[: picks[c]]]:
            anchors.append(ids[int(member)])
            weights.append(len(members) / len(ids) / picks[c])
    return AnchorSet(anchors, weights)
