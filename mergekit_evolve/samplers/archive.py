"""CycleQD's MAP-Elites archives: one per task, binned by the other tasks' scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Elite:
    """A scored individual: its task vector is ``mutation(sum_j coefficients_j tau_j + sum_t c_t tau_t)``,
    the experts' task vectors weighted, plus the mutated ancestors it inherits (``mix``: trial, c)."""

    trial: int
    coefficients: tuple[float, ...]
    mutation: tuple[int, float] | None  # (seed, scale); None: unmutated
    qualities: dict[str, float]  # per task, higher is better
    mix: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.trial, "coefficients": list(self.coefficients),
            "mutation": None if self.mutation is None else {"seed": self.mutation[0], "scale": self.mutation[1]},
            "inherits": [{"trial": t, "coefficient": c} for t, c in self.mix],
            "qualities": self.qualities,
        }


def bin_index(score: float, low: float, high: float, bins: int) -> int:
    """Equal bins over [low, high]; scores outside fall in the first or last bin."""
    return min(bins - 1, max(0, math.floor((score - low) / (high - low) * bins)))


@dataclass
class Archive:
    """The elites of one task: quality is that task's score, the cell is the others' bins."""

    task: str
    descriptors: list[str]
    bins: int
    bounds: dict[str, tuple[float, float]]
    cells: dict[tuple[int, ...], Elite] = field(default_factory=dict)

    def cell_of(self, qualities: dict[str, float]) -> tuple[int, ...]:
        return tuple(bin_index(qualities[d], *self.bounds[d], self.bins) for d in self.descriptors)

    def offer(self, elite: Elite) -> bool:
        """Insert ``elite`` when its cell is empty or holds a worse one; say whether it went in."""
        cell = self.cell_of(elite.qualities)
        held = self.cells.get(cell)
        if held is not None and held.qualities[self.task] >= elite.qualities[self.task]:
            return False
        self.cells[cell] = elite
        return True

    def elites(self) -> list[Elite]:
        return [self.cells[c] for c in sorted(self.cells)]

    def best(self) -> Elite | None:
        return max(self.elites(), key=lambda e: e.qualities[self.task], default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "descriptors": self.descriptors, "bins": self.bins,
            "bounds": {d: list(self.bounds[d]) for d in self.descriptors},
            "cells": [{"cell": list(c), **self.cells[c].to_json()} for c in sorted(self.cells)],
        }


def elite_probabilities(elites: list[Elite], tasks: list[str], slope: float = 0.3) -> np.ndarray:
    """CycleQD's elite sampling: ``p ~ prod_i (0.5 + slope norm(f_i))``, min-max normalised per task
    (the paper's text: slope 0.3; the released code: 0.8)."""
    f = np.array([[e.qualities[t] for t in tasks] for e in elites], dtype=float)
    span = f.max(axis=0) - f.min(axis=0)
    norm = np.divide(f - f.min(axis=0), span, out=np.zeros_like(f), where=span > 0)
    weights = np.prod(0.5 + slope * norm, axis=1)
    return weights / weights.sum()
