"""Vectors the samplers move in, and the Optuna params they stand for.

``UnitBox``: every numeric dimension mapped to [0, 1] (log-scale ones in log space), for CMA-ES.
``ExpertWeights``: a coefficient per expert (a source model with an annotated ``weight``), for
CycleQD and Model Swarms, whose individuals are combinations of the experts' task vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from mergekit_evolve.recipe.search_space import SearchSpace


class CoordinateError(ValueError):
    """The search space does not fit a sampler's coordinates (turned into SamplerSetupError)."""


def _snap(value: float, dist: FloatDistribution | IntDistribution) -> float | int:
    value = min(max(value, dist.low), dist.high)
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
        value = min(max(value, dist.low), dist.high)
    return int(round(value)) if isinstance(dist, IntDistribution) else float(value)


class UnitBox:
    """Numeric dimensions <-> points of the unit cube."""

    def __init__(self, distributions: dict[str, BaseDistribution]):
        bad = [n for n, d in distributions.items() if not isinstance(d, (FloatDistribution, IntDistribution))]
        if bad:
            raise CoordinateError(f"categorical dimensions {bad}")
        self.distributions: dict[str, FloatDistribution | IntDistribution] = dict(distributions)  # type: ignore[arg-type]
        self.names = list(distributions)

    def __len__(self) -> int:
        return len(self.names)

    def _ends(self, dist: FloatDistribution | IntDistribution) -> tuple[float, float]:
        if dist.log:
            return math.log(dist.low), math.log(dist.high)
        return float(dist.low), float(dist.high)

    def encode(self, params: dict[str, Any], missing: float | None = None) -> np.ndarray:
        """The unit-cube point of ``params``; dimensions absent from them take ``missing`` if given."""
        out = []
        for name in self.names:
            if name not in params and missing is not None:
                out.append(missing)
                continue
            dist = self.distributions[name]
            lo, hi = self._ends(dist)
            v = math.log(params[name]) if dist.log else float(params[name])
            out.append((v - lo) / (hi - lo))
        return np.clip(np.array(out), 0.0, 1.0)

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, u in zip(self.names, np.clip(x, 0.0, 1.0), strict=False):
            dist = self.distributions[name]
            lo, hi = self._ends(dist)
            v = lo + float(u) * (hi - lo)
            out[name] = _snap(math.exp(v) if dist.log else v, dist)
        return out


@dataclass(frozen=True)
class Expert:
    label: str
    dims: tuple[str, ...]
    entry: tuple[Any, ...] = ()  # where the expert's model entry is in the config, e.g. ("models", 2)


class ExpertWeights:
    """One coefficient per expert; an expert's coefficient fills all of its weight dimensions.

    An expert is a ``models:``/``sources:`` entry whose ``weight`` is searched (a gradient or
    filtered weights give it several dimensions, all moved together). The individual
    ``e_j`` (coefficient 1 on expert j, 0 elsewhere) merges to that expert itself.
    """

    def __init__(self, space: SearchSpace, sampler: str, extra: tuple[str, ...] = ()):
        owners: dict[tuple[Any, ...], list[str]] = {}
        for pl in space.placements:
            loc = pl.loc
            if "parameters" in loc and loc[loc.index("parameters") + 1 : loc.index("parameters") + 2] == ("weight",):
                owners.setdefault(loc[: loc.index("parameters")], []).extend(pl.dims)
        claimed = [d for dims in owners.values() for d in dims]
        shared = sorted({d for d in claimed if claimed.count(d) > 1})
        if shared:
            raise CoordinateError(
                f"{sampler} gives each expert its own coefficient, but {shared} is the weight of several models; "
                "give each model its own weight annotation"
            )
        others = [n for n in space.dimensions if n not in claimed and n not in extra]
        if others:
            raise CoordinateError(
                f"{sampler} moves only the experts' weights, but the recipe also searches {others}; "
                "give those a plain value, or use another sampler (cmaes, cma, tpe, ...)"
            )
        self.experts = [
            Expert(dims[0].split(".weight")[0] or ".".join(map(str, owner)), tuple(dict.fromkeys(dims)), owner)
            for owner, dims in owners.items()
        ]
        self.distributions: dict[str, FloatDistribution] = {}
        for expert in self.experts:
            for name in expert.dims:
                dim = space.dimensions[name]
                if dim.kind != "float" or dim.log or dim.step is not None:
                    raise CoordinateError(f"{sampler} needs plain float weights; '{name}' is {dim.describe()}")
                if not (dim.low <= 0.0 and dim.high >= 1.0):
                    raise CoordinateError(
                        f"{sampler} starts from the experts themselves (weight 1 on one, 0 on the others), "
                        f"but '{name}' searches [{dim.low}, {dim.high}]; widen it to include [0, 1]"
                    )
                self.distributions[name] = dim.distribution()  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.experts)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each coefficient's range: the intersection of its dimensions' ranges."""
        low = [max(self.distributions[n].low for n in e.dims) for e in self.experts]
        high = [min(self.distributions[n].high for n in e.dims) for e in self.experts]
        return np.array(low), np.array(high)

    def one_hot(self, j: int) -> np.ndarray:
        c = np.zeros(len(self.experts))
        c[j] = 1.0
        return c

    def params(self, coefficients: np.ndarray) -> dict[str, float]:
        """The Optuna params of a coefficient vector (clipped to each dimension's range)."""
        return {
            name: _snap(float(c), self.distributions[name])
            for expert, c in zip(self.experts, coefficients, strict=False)
            for name in expert.dims
        }

    def references(self, config: Any) -> list[Any]:
        """Each expert's ``ModelReference`` in a compiled config."""
        out = []
        for expert in self.experts:
            entry = config
            for key in expert.entry:
                entry = entry[key] if isinstance(key, int) else getattr(entry, key)
            out.append(entry.model)
        return out

    def models_in(self, config: Any) -> list[str]:
        """Each expert's model in a compiled config, as mergekit names it (``str`` of its ModelReference)."""
        return [str(model) for model in self.references(config)]

    def coefficients(self, params: dict[str, Any]) -> np.ndarray:
        """A trial's coefficient per expert (the mean of its dimensions, for gradients)."""
        return np.array([np.mean([params[n] for n in expert.dims]) for expert in self.experts])
