"""Staged recipes: several searches in one file, a later one merging an earlier one's winner.

A staged recipe has a single top-level key, ``stages:``, a list of recipe bodies (each an
ordinary recipe with ``evolve:``) plus a ``name``::

    stages:
      - name: ps                  # parameter space: dare_ties over three models
        merge_method: dare_ties
        ...
      - name: dfs                 # data flow space: route between the PS winner and one source
        merge_method: passthrough
        routing:
          models: [stage:ps, augmxnt/shisa-gamma-7b-v1]

The string ``stage:NAME`` stands for the winner of the earlier stage NAME anywhere a model goes
(``model``, ``base_model``, ``routing.models``, keys of ``routing.num_layers``); it becomes
``RUN_DIR/NAME/best``, the folder that stage writes its winner to. YAML anchors share settings
(e.g. objectives) between stages.

Each stage runs in ``RUN_DIR/NAME/`` with its own study (``<recipe>-<NAME>`` unless
``evolve.study_name``); :func:`mergekit_evolve.pipeline.run_stages` runs them in order.

All stages are validated before the first search. A winner that does not exist yet is
previewed by the model the earlier stage starts from (its compiled init config's layer count),
unless ``routing.num_layers`` gives the count for ``stage:NAME``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_evolve.recipe import routing
from mergekit_evolve.recipe.parse import Recipe, parse_recipe
from mergekit_evolve.recipe.yaml_lines import Loc, LocatedYaml
from mergekit_evolve.runfolder import RunFolder

LOG = logging.getLogger(__name__)

KEY = "stages"
PREFIX = "stage:"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Stage:
    name: str
    recipe: Recipe
    run_dir: Path
    uses: tuple[str, ...]  # earlier stages whose winners this one merges


def winner_dir(run_dir: Path, stage: str) -> Path:
    return RunFolder(run_dir).stage(stage).best


def _body(doc: LocatedYaml, index: int, names: dict[str, Path], study_name: str) -> tuple[LocatedYaml, set[str]]:
    """Stage ``index`` as a recipe document: ``stage:NAME`` replaced by winner folders, lines kept."""
    lines: dict[Loc, int] = {}
    uses: set[str] = set()
    prefix: Loc = (KEY, index)

    def subst(value: Any, loc: Loc) -> Any:
        if not (isinstance(value, str) and value.startswith(PREFIX)):
            return value
        ref = value.removeprefix(PREFIX)
        if ref not in names:
            earlier = ", ".join(names) or "none"
            raise doc.error(loc, f"'{value}' names no earlier stage (earlier stages: {earlier})")
        uses.add(ref)
        return str(names[ref])

    def walk(value: Any, old: Loc, new: Loc) -> Any:
        if old in doc.lines:
            lines[new] = doc.lines[old]
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key = subst(k, old + (k,))
                out[key] = walk(v, old + (k,), new + (key,))
            return out
        if isinstance(value, list):
            return [walk(v, old + (i,), new + (i,)) for i, v in enumerate(value)]
        return subst(value, old)

    data = walk(doc.data[KEY][index], prefix, ())
    data.pop("name")
    if isinstance(data.get("evolve"), dict):
        data["evolve"].setdefault("study_name", study_name)
    return LocatedYaml(data=data, source=doc.source, lines=lines), uses


def _check_layout(doc: LocatedYaml) -> list[str]:
    """The stage names, after checking the file's shape."""
    for key in doc.data:
        if key != KEY:
            raise doc.error((key,), f"a staged recipe has only '{KEY}:' at the top; move '{key}' into a stage "
                                    "(YAML anchors can share it between stages)")
    stages = doc.data[KEY]
    if not isinstance(stages, list) or not stages:
        raise doc.error((KEY,), f"'{KEY}:' must be a non-empty list of recipe bodies, each with a 'name'")
    names: list[str] = []
    for i, body in enumerate(stages):
        if not isinstance(body, dict):
            raise doc.error((KEY, i), "a stage is a mapping: a recipe body with a 'name'")
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise doc.error((KEY, i, "name") if "name" in body else (KEY, i),
                            "each stage needs a 'name' made of letters, digits, '_', '.', '-' "
                            "(it names its run folder)")
        if name in names:
            raise doc.error((KEY, i, "name"), f"two stages are named '{name}'")
        if "evolve" not in body:
            raise doc.error((KEY, i), f"stage '{name}' has no 'evolve:' section; every stage is a search")
        names.append(name)
    return names


def _preview_layers(recipe: Recipe) -> int | None:
    """The layer count of the model a stage starts from (its compiled init point), if readable."""
    config = recipe.compile(recipe.search_space.default_point())
    if config.slices:
        return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in config.slices)
    donor = config.base_model or config.models[0].model
    try:
        cfg = routing.read_config(str(donor))
    except ValueError:
        return None
    return cfg.num_hidden_layers if cfg is not None else None


def _add_previews(doc: LocatedYaml, uses: set[str], done: dict[str, Stage], run_dir: Path) -> None:
    """Layer counts for routed winners: the real config once it exists, else the earlier stage's start."""
    block = doc.data.get(routing.KEY)
    if not isinstance(block, dict) or not isinstance(block.get("num_layers", {}), dict):
        return  # not routed, or malformed: routing's own validation names it
    for name in uses:
        folder = str(winner_dir(run_dir.resolve(), name))
        counts = block.get("num_layers", {})
        if (Path(folder) / "config.json").exists():
            counts.pop(folder, None)  # the real winner is authoritative, not the recipe's guess
        elif folder not in counts and folder in block.get("models", []):
            n = _preview_layers(done[name].recipe)
            if n is None:
                raise doc.error((routing.KEY, "models"), f"stage '{name}' has no winner yet and the layer count "
                                                         "of the model it starts from is not readable; "
                                                         f"give it in routing.num_layers: {{'{PREFIX}{name}': N}}")
            block["num_layers"] = {**counts, folder: n}


def is_staged(doc: LocatedYaml) -> bool:
    return isinstance(doc.data, dict) and KEY in doc.data


def stage_body(data: Any, stage: str | None) -> dict[str, Any]:
    """The body stage ``stage`` runs, read from a recipe's plain YAML data (the whole mapping when
    the recipe is not staged); empty when there is no such stage."""
    if isinstance(data, dict) and isinstance(data.get(KEY), list):
        data = next((s for s in data[KEY] if isinstance(s, dict) and s.get("name") == stage), {})
    return data if isinstance(data, dict) else {}


def parse_stages(doc: LocatedYaml, path: Path, text: str, run_dir: Path, until: str | None = None) -> list[Stage]:
    """The stages of a staged recipe (up to ``until``), validated; winners not written yet are previewed."""
    names = _check_layout(doc)
    stages: dict[str, Stage] = {}
    for i, name in enumerate(names[: names.index(until) + 1] if until else names):
        winners = {n: winner_dir(run_dir.resolve(), n) for n in names[:i]}  # absolute: configs name them
        body, uses = _body(doc, i, winners, f"{path.stem}-{name}")
        _add_previews(body, uses, stages, run_dir)
        recipe = parse_recipe(body, path, text)
        stages[name] = Stage(name, recipe, RunFolder(run_dir).stage(name).path, tuple(sorted(uses)))
    return list(stages.values())
