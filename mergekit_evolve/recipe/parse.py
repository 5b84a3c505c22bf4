"""One search's recipe body -> a ``Recipe``: its mergekit template, search space and settings.

A body is a mergekit config whose values may be search annotations, plus ``evolve:``,
``publish:`` and ``routing:``. ``recipe.document`` reads files; this module only parses.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from mergekit import merge_methods
from mergekit.config import MergeConfiguration

from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe import routing
from mergekit_evolve.recipe.annotations import (
    ChoiceAnnotation,
    RangeAnnotation,
    VarAnnotation,
    get_at,
    is_annotation,
    parse_annotation,
    walk,
)
from mergekit_evolve.recipe.compile import compile_template
from mergekit_evolve.recipe.evolve_settings import RESUMABLE, EvolveSettings
from mergekit_evolve.recipe.model_paths import resolve_model_path, resolve_model_paths
from mergekit_evolve.recipe.publish_settings import PublishSettings
from mergekit_evolve.recipe.search_space import Dimension, Placement, SearchSpace
from mergekit_evolve.recipe.yaml_lines import Loc, LocatedYaml, RecipeError

LOG = logging.getLogger(__name__)
MERGEKIT_KEYS = set(MergeConfiguration.model_fields)
SettingsT = TypeVar("SettingsT", bound=pydantic.BaseModel)
SETTINGS_KEYS = {"evolve", "publish"}  # sections of this package, not part of the mergekit config
RECIPE_KEYS = MERGEKIT_KEYS | SETTINGS_KEYS | {routing.KEY}


@dataclass
class Recipe:
    """One search, parsed once: everything later steps derive from the recipe comes from here."""

    path: Path
    doc: LocatedYaml
    template: dict[str, Any]
    evolve: EvolveSettings | None
    search_space: SearchSpace
    text: str  # the recipe as run folders keep it: the file, or the translation of a genome file
    publish: PublishSettings | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.path.stem

    def error(self, loc: Loc, message: str) -> RecipeError:
        return self.doc.error(loc, message)

    def compile(self, point: dict[str, Any]) -> MergeConfiguration:
        """The concrete mergekit config ``point`` stands for (mergekit validates it)."""
        return compile_template(self.doc, self.template, self.search_space, point)

    def fingerprint(self) -> str:
        """What the study means: the search space and what the sampler and the objectives are, so a
        resume can tell its own run folder from another recipe's. The rest of the config (models,
        fixed values) is ``config_fingerprint``: a fix there may resume a run whose trials all failed."""
        evolve = self.evolve.model_dump(mode="json", exclude=RESUMABLE) if self.evolve else None
        space = {name: dataclasses.asdict(dim) for name, dim in self.search_space.dimensions.items()}
        return _digest({"space": space, "evolve": evolve})

    def earlier_fingerprint(self) -> str:
        """What run folders written before ``fingerprint`` covered only the search space hold
        (the template and the settings): accepted on resume, so those runs go on."""
        evolve = self.evolve.model_dump(mode="json", exclude=RESUMABLE) if self.evolve else None
        return _digest({"config": self.template, "evolve": evolve})

    def fingerprints(self) -> tuple[str, ...]:
        """Every fingerprint a run folder of this recipe may hold."""
        return self.fingerprint(), self.earlier_fingerprint()

    def config_fingerprint(self) -> str:
        """The whole mergekit template (models, methods, fixed values)."""
        return _digest(self.template)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_label(template: dict[str, Any], loc: Loc) -> str | None:
    """A short name for the model entry that ``loc`` belongs to (its folder name when unique)."""
    for i in range(len(loc) - 1, 0, -1):
        if isinstance(loc[i], int) and loc[i - 1] in ("models", "sources"):
            group = get_at(template, loc[:i])
            entry = group[loc[i]]
            names = [os.path.basename(str(e.get("model", "")).rstrip("/")) for e in group if isinstance(e, dict)]
            label = names[loc[i]] if isinstance(entry, dict) else ""
            if not label or names.count(label) > 1:
                label = f"{loc[i - 1]}[{loc[i]}]"
            prefix = (".".join(f"{k}[{j}]" for k, j in zip(loc[: i - 1 : 2], loc[1 : i - 1 : 2], strict=False))
                      if i > 1 else "")
            return f"{prefix}.{label}" if prefix else label
    return None


def dimension_name(template: dict[str, Any], loc: Loc) -> str:
    """A readable, stable name for the value at ``loc`` (as Optuna and the dashboard show it)."""
    if "parameters" not in loc:
        return ".".join(str(k) for k in loc)
    p = loc.index("parameters")
    owner = _model_label(template, loc[:p]) or ".".join(str(k) for k in loc[:p])
    param = str(loc[p + 1]) if len(loc) > p + 1 else "parameters"
    rest = loc[p + 2 :]
    if rest and isinstance(rest[0], int):
        entry = get_at(template, loc[: p + 3])
        flt = entry.get("filter") if isinstance(entry, dict) else None
        param += f"[{flt or '*'}]"
    return f"{owner}.{param}" if owner else param


def _check_placement(doc: LocatedYaml, loc: Loc) -> None:
    if loc == ("merge_method",) or "parameters" in loc:
        return
    if loc and loc[-1] in ("layer_range",) or (len(loc) >= 2 and loc[-2] == "layer_range"):
        return
    raise doc.error(
        loc,
        "a search annotation can stand for merge_method, a layer_range bound or a value under "
        f"'parameters', not for '{'.'.join(map(str, loc))}'",
    )


def build_space(doc: LocatedYaml, template: dict[str, Any], base_dir: Path | None = None) -> SearchSpace:
    space = SearchSpace()
    if routing.KEY in template:
        # validated in place (absolute paths, every layer count), so ``fill`` needs no files
        block = routing.prepare_routing(doc, template, lambda m: resolve_model_path(m, base_dir or Path.cwd()))
        routing.add_dimensions(space, block)
    named: dict[str, tuple[Any, Loc]] = {}
    pending_vars: list[tuple[Loc, VarAnnotation]] = []
    for loc, value in list(walk(template)):
        if not is_annotation(value):
            continue
        _check_placement(doc, loc)
        try:
            ann = parse_annotation(value)
        except pydantic.ValidationError as e:
            where, message = validation_message(e)
            key = f"'{'.'.join(map(str, where))}': " if where else ""
            raise doc.error(loc + where, f"bad search annotation: {key}{message}") from None
        if isinstance(ann, VarAnnotation):
            pending_vars.append((loc, ann))
            continue
        base = ann.name or dimension_name(template, loc)
        if ann.name:
            if ann.name in named:
                first, first_loc = named[ann.name]
                if first != ann:
                    raise doc.error(
                        loc,
                        f"'{ann.name}' is defined differently at line {doc.line_of(first_loc)}; "
                        f"repeat it identically or write {{var: {ann.name}}}",
                    )
                space.placements.append(Placement(loc, _placement_dims(space, ann.name), _is_gradient(ann)))
                continue
            named[ann.name] = (ann, loc)
        dims = _add_dimensions(space, doc, loc, base, ann)
        space.placements.append(Placement(loc, dims, _is_gradient(ann)))
    for loc, var in pending_vars:
        if var.var not in named:
            raise doc.error(loc, f"{{var: {var.var}}} names no annotation; give one annotation 'name: {var.var}'")
        ann, _ = named[var.var]
        space.placements.append(Placement(loc, _placement_dims(space, var.var), _is_gradient(ann)))
    return space


def _is_gradient(ann: Any) -> bool:
    return isinstance(ann, RangeAnnotation) and ann.points > 1


def _placement_dims(space: SearchSpace, name: str) -> tuple[str, ...]:
    if name in space.dimensions:
        return (name,)
    return tuple(n for n in space.dimensions if n.startswith(name + "@"))


def _add_dimensions(space: SearchSpace, doc: LocatedYaml, loc: Loc, base: str, ann: Any) -> tuple[str, ...]:
    if isinstance(ann, ChoiceAnnotation):
        dims = [Dimension(base, "categorical", choices=tuple(ann.choice), init=ann.init)]
    else:
        inits = ann.init_values() or [None] * ann.points
        names = [base] if ann.points == 1 else [f"{base}@{k}" for k in range(ann.points)]
        cast = int if ann.type == "int" else float
        dims = [
            Dimension(
                n, ann.type, low=cast(ann.search[0]), high=cast(ann.search[1]), log=ann.log, step=ann.step,
                init=None if i is None else cast(i),
            )
            for n, i in zip(names, inits, strict=False)
        ]
    for d in dims:
        if d.name in space.dimensions:
            raise doc.error(loc, f"two annotations both make a dimension named '{d.name}'; give one a 'name:'")
        space.dimensions[d.name] = d
    return tuple(d.name for d in dims)


def _check_methods(doc: LocatedYaml, template: dict[str, Any], space: SearchSpace) -> None:
    register_plugins()
    known = {m.spec.name: m for m in merge_methods.registered_methods()}
    method = template.get("merge_method")
    if method is None:
        raise doc.error((), "the recipe names no merge_method")
    candidates = space.dimensions["merge_method"].choices if is_annotation(method) else (method,)
    for name in candidates:
        if not isinstance(name, str) or name not in known:
            raise doc.error(("merge_method",),
                            f"unknown merge method '{name}'; mergekit knows: {', '.join(sorted(known))}")
    accepted = {p.name for name in candidates for p in known[name].spec.parameters}
    real = {p.name for m in known.values() for p in m.spec.parameters}
    for loc, _ in walk(template):
        if len(loc) >= 2 and loc[-2] == "parameters" and loc[-1] not in accepted:
            method_name, takes = "/".join(candidates), ", ".join(sorted(accepted)) or "none"
            if loc[-1] in real:
                # mergekit ignores a real parameter its method does not take; configs in the wild carry some
                LOG.warning("%s:%s: merge method %s ignores parameter '%s' (it takes: %s)",
                            doc.source, doc.line_of(loc), method_name, loc[-1], takes)
                continue
            hint = difflib.get_close_matches(str(loc[-1]), sorted(real), n=1)
            raise doc.error(
                loc,
                f"merge method {method_name} takes no parameter '{loc[-1]}', nor does any other method"
                + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; it takes: {takes}",
            )


def _settings(doc: LocatedYaml, key: str, model: type[SettingsT]) -> SettingsT | None:
    """A validated settings section, or None when absent; errors name the offending line."""
    if key not in doc.data:
        return None
    try:
        return model.model_validate(doc.data[key])
    except pydantic.ValidationError as e:
        where, message = validation_message(e)
        loc = (key, *where)
        raise doc.error(loc, f"{'.'.join(map(str, loc))}: {message}") from None


def validation_message(e: pydantic.ValidationError) -> tuple[Loc, str]:
    """The first error's place in the user's document and what is wrong there.

    Pydantic names the member of a union each attempt tried (``batch_size.int``,
    ``batch_size.str``): those are its names, not the user's, so they are dropped and the
    attempts at one place are joined with "or"."""

    def place(err: Any) -> Loc:
        return tuple(k for k in err["loc"] if not (isinstance(k, str) and (k in _TYPE_TAGS or "[" in k)))

    errors = e.errors()
    where = place(errors[0])
    messages = list(dict.fromkeys(err["msg"] for err in errors if place(err) == where))
    return where, " or ".join([messages[0], *(m.removeprefix("Input should be ") for m in messages[1:])])


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple", "none"}


def parse_recipe(doc: LocatedYaml, path: Path, text: str) -> Recipe:
    """Parse one search's body; ``path`` is the recipe file (local models resolve against its folder)."""
    if not isinstance(doc.data, dict):
        raise doc.error((), "a recipe is a YAML mapping (a mergekit config plus an optional 'evolve:' section)")
    for key in doc.data:
        if key not in RECIPE_KEYS:
            raise doc.error((key,), f"unknown key '{key}'; a recipe has mergekit's keys "
                                    f"({', '.join(sorted(MERGEKIT_KEYS))}), 'evolve', 'publish' and 'routing'")
    template = {k: v for k, v in doc.data.items() if k not in SETTINGS_KEYS}
    evolve = _settings(doc, "evolve", EvolveSettings)
    publish = _settings(doc, "publish", PublishSettings)
    space = build_space(doc, template, path.parent)
    _check_methods(doc, template, space)
    resolve_model_paths(template, path.parent, doc)
    recipe = Recipe(path=path, doc=doc, template=template, evolve=evolve, search_space=space, text=text,
                    publish=publish)
    recipe.compile(space.default_point())
    if space and evolve is None:
        raise doc.error((), "the recipe has search annotations but no 'evolve:' section with objectives")
    return recipe
