"""Anchor examples: estimate a split's score from a few representative examples.

As in tinyBenchmarks, examples are clustered by how the source models did on them (their
per-example results on the search split); the example nearest each cluster's centre is an
anchor, weighted by its cluster's share of the split. A candidate's estimate is the weighted
mean of its anchor results. Only for metrics lm-eval aggregates by a mean.
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
    km = KMeans(n_clusters=size, random_state=seed, n_init=10).fit(points)
    anchors, weights = [], []
    for c in range(size):
        members = np.flatnonzero(km.labels_ == c)
        if not len(members):
            continue
        nearest = members[np.argmin(((points[members] - km.cluster_centers_[c]) ** 2).sum(axis=1))]
        anchors.append(ids[int(nearest)])
        weights.append(len(members) / len(ids))
    return AnchorSet(anchors, weights)
