"""The search annotations a recipe may put in place of a mergekit value.

``{search: [lo, hi]}``           a float in a range (``log``, ``init``, ``step`` optional)
``{search: [lo, hi], type: int}`` an integer
``{search: [lo, hi], points: N}`` a mergekit gradient of N searched values
``{choice: [a, b, ...]}``        a categorical value (any scalar, also a merge method name)
``{var: name}``                  the value of the annotation named ``name`` elsewhere
Any annotation may carry ``name:`` so several places share one search dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_evolve.recipe.yaml_lines import Loc

Scalar = bool | int | float | str

ANNOTATION_KEYS = {"search", "choice", "var"}


class _Annotation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = Field(default=None, description="ties every place with this name to one dimension")


class RangeAnnotation(_Annotation):
    search: tuple[float, float]
    type: Literal["float", "int"] = "float"
    log: bool = False
    step: float | None = None
    init: float | list[float] | None = None
    points: int = Field(default=1, ge=1, description="number of gradient points across the layers")

    @model_validator(mode="after")
    def _check(self) -> RangeAnnotation:
        lo, hi = self.search
        if not lo < hi:
            raise ValueError(f"search range [{lo}, {hi}] is empty: the low end must be below the high end")
        if self.log and lo <= 0:
            raise ValueError(f"a log-scale range must be positive, got [{lo}, {hi}]")
        if self.type == "int" and (lo != int(lo) or hi != int(hi)):
            raise ValueError(f"an integer range needs whole-number ends, got [{lo}, {hi}]")
        inits = self.init if isinstance(self.init, list) else [self.init] * self.points
        if self.init is not None:
            if len(inits) != self.points:
                raise ValueError(f"init has {len(inits)} values but points is {self.points}")
            for v in inits:
                if not lo <= v <= hi:
                    raise ValueError(f"init {v} is outside the search range [{lo}, {hi}]")
        return self

    def init_values(self) -> list[float] | None:
        if self.init is None:
            return None
        return list(self.init) if isinstance(self.init, list) else [self.init] * self.points


class ChoiceAnnotation(_Annotation):
    choice: list[Scalar] = Field(min_length=1)
    init: Scalar | None = None

    @model_validator(mode="after")
    def _check(self) -> ChoiceAnnotation:
        if self.init is not None and self.init not in self.choice:
            raise ValueError(f"init {self.init!r} is not one of the choices {self.choice}")
        if len(set(map(repr, self.choice))) != len(self.choice):
            raise ValueError(f"choices repeat a value: {self.choice}")
        return self


class VarAnnotation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    var: str


Annotation = RangeAnnotation | ChoiceAnnotation | VarAnnotation


def is_annotation(value: Any) -> bool:
    """A mapping is an annotation when it has exactly one of the annotation keys."""
    return isinstance(value, dict) and len(ANNOTATION_KEYS & set(value)) == 1


def parse_annotation(value: dict[str, Any]) -> Annotation:
    if "search" in value:
        return RangeAnnotation.model_validate(value)
    if "choice" in value:
        return ChoiceAnnotation.model_validate(value)
    return VarAnnotation.model_validate(value)


def walk(value: Any, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Every location of a recipe tree and its value, not descending into annotations."""
    yield loc, value
    if is_annotation(value):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, loc + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, loc + (i,))


def get_at(tree: Any, loc: Loc) -> Any:
    for k in loc:
        tree = tree[k]
    return tree


def set_at(tree: Any, loc: Loc, value: Any) -> None:
    get_at(tree, loc[:-1])[loc[-1]] = value
