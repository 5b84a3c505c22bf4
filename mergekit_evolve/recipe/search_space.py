"""Typed search dimensions and where their values land in the mergekit config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mergekit_evolve.recipe.yaml_lines import Loc


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    init: Any = None

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def default(self) -> Any:
        """The init value, else the middle of the range, else the first choice."""
        if self.init is not None:
            return self.init
        if self.kind == "categorical":
            return self.choices[0]
        mid = (self.low + self.high) / 2
        return int(round(mid)) if self.kind == "int" else mid

    def describe(self) -> str:
        if self.kind == "categorical":
            text = f"choice of {list(self.choices)}"
        else:
            text = f"{self.kind} in [{self.low}, {self.high}]" + (" (log)" if self.log else "")
        return text + (f", init {self.init}" if self.init is not None else "")


@dataclass(frozen=True)
class Placement:
    """``loc`` in the config takes the value of ``dims`` (one name: a scalar; several: a gradient)."""

    loc: Loc
    dims: tuple[str, ...]
    gradient: bool = False


@dataclass
class SearchSpace:
    dimensions: dict[str, Dimension] = field(default_factory=dict)
    placements: list[Placement] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dimensions)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {name: d.distribution() for name, d in self.dimensions.items()}

    def default_point(self) -> dict[str, Any]:
        return {name: d.default() for name, d in self.dimensions.items()}

    def init_point(self) -> dict[str, Any]:
        """Only the dimensions the recipe gave an ``init`` for (a partial Optuna trial)."""
        return {name: d.init for name, d in self.dimensions.items() if d.init is not None}

    def categorical(self) -> list[str]:
        return [n for n, d in self.dimensions.items() if d.kind == "categorical"]
