"""A point of the search space -> the concrete mergekit config it stands for (routing included)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pydantic
from mergekit.config import MergeConfiguration

from mergekit_evolve.recipe import routing
from mergekit_evolve.recipe.annotations import set_at
from mergekit_evolve.recipe.search_space import SearchSpace
from mergekit_evolve.recipe.yaml_lines import LocatedYaml


def fill(template: dict[str, Any], space: SearchSpace, point: dict[str, Any]) -> dict[str, Any]:
    """The template with every annotation replaced by its value at ``point``."""
    out = copy.deepcopy(template)
    for pl in space.placements:
        values = [point[d] for d in pl.dims]
        set_at(out, pl.loc, values if pl.gradient else values[0])
    return routing.routed_config(out, point) if routing.KEY in out else out


def validate_config(doc: LocatedYaml, data: dict[str, Any]) -> MergeConfiguration:
    """Let mergekit validate ``data``; map its complaints to recipe lines."""
    try:
        return MergeConfiguration.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = tuple(k for k in err["loc"] if not (isinstance(k, str) and k[:1].isupper() or "[" in str(k)))
        raise doc.error(loc, f"mergekit rejects '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    except RuntimeError as e:  # mergekit's model validators raise plain RuntimeErrors
        raise doc.error((), f"mergekit rejects the config: {e}") from None


def compile_template(doc: LocatedYaml, template: dict[str, Any], space: SearchSpace,
                     point: dict[str, Any]) -> MergeConfiguration:
    """Substitute ``point`` into the template and let mergekit validate the result."""
    missing = set(space.dimensions) - set(point)
    if missing:
        raise ValueError(f"the point lacks values for {sorted(missing)}")
    return validate_config(doc, fill(template, space, point))


def config_digest(config: MergeConfiguration) -> str:
    """Identical configs (and so identical merged models) share a digest."""
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:16]
