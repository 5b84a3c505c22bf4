"""mergekit-evolve genome files (mergekit's deprecated ``mergekit-evolve``) as recipes.

A genome file (``genome:`` + ``tasks:`` ...; mergekit/evo/config.py, mergekit/evo/genome.py) is
validated with mergekit's own pydantic models, then translated into the recipe that searches
the same configs:

- The genotype is ``[layer groups, models, filter sets, method parameters]``; each entry
  becomes one search dimension. ``layer_granularity: 0`` is one group (a ``models:`` config);
  ``layer_granularity: G`` makes ``num_layers / G`` groups: one slice of G layers per group
  with its own annotations, or, with ``smooth: true``, one gradient of that many ``points``
  per parameter (mergekit interpolates between them across the layers).
- ``filters`` become ``[{filter: F, value: ...}, ..., {value: ...}]`` settings.
- mergekit-evolve folds weights through ``abs()`` unless ``allow_negative_weights`` and clamps
  densities to [0, 1]; the recipe searches weights in [0, 1] (or [-1, 1]) and densities in
  [0, 1]. mergekit-evolve runs pycma's CMA-ES, and so does the recipe (``sampler: cma``):
  its start x0 becomes ``init`` (1/#models for weights, 1 for densities) unless
  ``random_init``, and its step size is the same 1/6 (of each range; ``--sigma0`` changes it).
  A single dimension (slerp of one layer group) is left to TPE: CMA-ES needs two.
- ``normalize`` (default: on for linear, ties, dare_ties), ``int8_mask: true`` and
  ``dtype: bfloat16`` are what mergekit-evolve writes into every config; parameters the merge
  method does not take are left out (mergekit ignores them).
- slerp: mergekit-evolve slerps the two highest-weighted models of each layer group. With two
  models that is one ``t`` per group (slerp(t; A, B) = slerp(1 - t; B, A)); more models have no
  recipe equivalent and are refused.
- ``tasks`` become objectives (weight, metric, ``limit``, ``num_fewshot``); a negative weight
  is an objective to minimise. ``apply_chat_template`` keeps mergekit-evolve's default (true).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml
from mergekit import merge_methods

from mergekit_evolve.compat.mergekit import evol_merge_configuration, genome_tables
from mergekit_evolve.recipe.annotations import is_annotation
from mergekit_evolve.recipe.model_paths import resolve_model_path
from mergekit_evolve.recipe.yaml_lines import Loc, LocatedYaml

LOG = logging.getLogger(__name__)

GENOME_KEY = "genome"
# mergekit-evolve's defaults for what a genome file does not say (its CLI: --max-fevals 100, --random-seed 0)
DEFAULT_TRIALS = 100
DEFAULT_SEED = 0
DTYPE = "bfloat16"
# words in mergekit's validator messages -> the genome key they are about (first match wins)
_ASSERT_KEYS = {"smooth": "smooth", "filter": "filters", "base_model": "base_model", "merge method": "merge_method"}


@dataclass
class GenomeTranslation:
    recipe: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)  # recipe location -> line in the genome file
    notes: list[str] = field(default_factory=list)  # what the recipe does not carry over

    def doc(self, source: str) -> LocatedYaml:
        return LocatedYaml(data=self.recipe, source=source, lines=self.lines)


def is_genome(data: Any) -> bool:
    return isinstance(data, dict) and GENOME_KEY in data


def _validate(doc: LocatedYaml) -> Any:
    try:
        return evol_merge_configuration().model_validate(doc.data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = tuple(k for k in err["loc"] if not (isinstance(k, str) and "[" in k))
        msg = str(err["msg"]).removeprefix("Assertion failed, ").removeprefix("Value error, ")
        if loc == (GENOME_KEY,):
            loc += next(((k,) for word, k in _ASSERT_KEYS.items() if word in msg), ())
        raise doc.error(loc, f"not a valid mergekit-evolve genome file: {'.'.join(map(str, loc))}: {msg}") from None


def _num_layers(doc: LocatedYaml, genome: Any, base_dir: Path) -> int:
    """mergekit-evolve reads the layer count from the first model's config."""
    ref = genome.models[0]
    local = ref.model_copy(update={"model": ref.model.model_copy(
        update={"path": resolve_model_path(ref.model.path, base_dir)})})
    try:
        return int(local.config().num_hidden_layers)
    except (OSError, ValueError, AttributeError) as e:
        raise doc.error(
            (GENOME_KEY, "layer_granularity"),
            f"layer_granularity needs the layer count of '{ref}', but its config is not available: {e}",
        ) from None


class _Builder:
    """Collects the recipe and, for error messages, which genome line each part came from."""

    def __init__(self, doc: LocatedYaml, rebase: Callable[[str], str]):
        self.doc = doc
        self.rebase = rebase
        self.out = GenomeTranslation(recipe={}, lines={(): doc.line_of(()) or 1})

    def origin(self, loc: Loc, genome_loc: Loc) -> None:
        self.out.lines[loc] = self.doc.line_of(genome_loc) or 1

    def model(self, raw: Any) -> Any:
        """The genome's own spelling of a model reference, local paths rebased."""
        if isinstance(raw, str):
            return self.rebase(raw)
        if isinstance(raw, dict) and isinstance(raw.get("model"), str):
            return {**raw, "model": self.rebase(raw["model"])}
        return raw

    def note(self, text: str) -> None:
        self.out.notes.append(text)


def _annotation(param: str, genome: Any, random_init: bool, points: int) -> dict[str, Any]:
    if param == "density":
        ann: dict[str, Any] = {"search": [0.0, 1.0], "init": 1.0}
    elif param == "t":
        ann = {"search": [0.0, 1.0], "init": 0.5}  # equal weights: softmax gives t = 0.5
    else:
        ann = {"search": [-1.0 if genome.allow_negative_weights else 0.0, 1.0], "init": 1.0 / len(genome.models)}
    if random_init:
        del ann["init"]  # CMA-ES then starts from the middle of the box
    if points > 1:
        ann["points"] = points
    return ann


def _setting(param: str, genome: Any, random_init: bool, points: int) -> Any:
    """One parameter's value: an annotation, or one per filter plus the fallback."""
    if not genome.filters:
        return _annotation(param, genome, random_init, points)
    return [{"filter": f, "value": _annotation(param, genome, random_init, points)} for f in genome.filters] + [
        {"value": _annotation(param, genome, random_init, points)}
    ]


def _shared_parameters(genome: Any) -> dict[str, Any]:
    normalize = genome.normalize
    if normalize is None:
        normalize = genome.merge_method in ("ties", "dare_ties", "linear")
    takes = {p.name for p in merge_methods.get(genome.merge_method).spec.parameters}
    return {k: v for k, v in {"normalize": normalize, "int8_mask": True}.items() if k in takes}


def _config(b: _Builder, cfg: Any, groups: int, layer_step: int) -> None:
    method_params, _ = genome_tables()
    genome, raw = cfg.genome, b.doc.data[GENOME_KEY]
    params = method_params[genome.merge_method]
    base_outside = genome.base_model is not None and genome.base_model not in genome.models
    rec = b.out.recipe
    rec["merge_method"] = genome.merge_method
    b.origin(("merge_method",), (GENOME_KEY, "merge_method"))
    if genome.merge_method == "slerp":
        if len(genome.models) != 2:
            raise b.doc.error(
                (GENOME_KEY, "models"),
                f"a slerp genome with {len(genome.models)} models slerps the two highest-weighted models of each "
                "layer group, which no recipe can express; list exactly two models "
                "(or search a linear/multislerp recipe)",
            )
        if base_outside:
            raise b.doc.error((GENOME_KEY, "base_model"), "a slerp genome's base_model must be one of its two models")
        # t is relative to the first model; mergekit-evolve's choice of base only mirrors t
        rec["base_model"] = b.model(raw["models"][0])
    elif genome.base_model is not None:
        rec["base_model"] = b.model(raw["base_model"])
    b.origin(("base_model",), (GENOME_KEY, "base_model"))

    def sources(layer_range: list[int] | None, points: int) -> list[dict[str, Any]]:
        # every entry gets its own layer_range list: shared ones would be written as YAML anchors
        out = []
        for raw_model in raw["models"]:
            entry: dict[str, Any] = {"model": b.model(raw_model)}
            if layer_range:
                entry["layer_range"] = list(layer_range)
            if genome.merge_method != "slerp":
                entry["parameters"] = {p: _setting(p, genome, cfg.random_init, points) for p in params}
            out.append(entry)
        if base_outside:
            out.append({"model": b.model(raw["base_model"]),
                        **({"layer_range": list(layer_range)} if layer_range else {})})
        return out

    if groups == 1 or genome.smooth:
        rec["models"] = sources(None, groups if genome.smooth else 1)
        for i in range(len(genome.models)):
            b.origin(("models", i), (GENOME_KEY, "models", i))
        if genome.merge_method == "slerp":
            rec["parameters"] = {"t": _annotation("t", genome, cfg.random_init, 1)}
    else:
        rec["slices"] = []
        for k in range(groups):
            piece: dict[str, Any] = {"sources": sources([k * layer_step, (k + 1) * layer_step], 1)}
            if genome.merge_method == "slerp":
                piece["parameters"] = {"t": _annotation("t", genome, cfg.random_init, 1)}
            rec["slices"].append(piece)
            b.origin(("slices", k), (GENOME_KEY, "layer_granularity"))
            for i in range(len(genome.models)):
                b.origin(("slices", k, "sources", i), (GENOME_KEY, "models", i))
    shared = _shared_parameters(genome)
    if shared:
        rec.setdefault("parameters", {}).update(shared)
    b.origin(("parameters",), (GENOME_KEY, "normalize"))
    rec["dtype"] = DTYPE
    if genome.tokenizer_source is not None:
        rec["tokenizer_source"] = b.model(raw["tokenizer_source"])
        b.origin(("tokenizer_source",), (GENOME_KEY, "tokenizer_source"))


def _evolve(b: _Builder, cfg: Any, dimensions: int) -> None:
    objectives = []
    for i, task in enumerate(cfg.tasks):
        if task.weight == 0:
            b.note(f"task '{task.name}' has weight 0 and is not scored")
            continue
        obj: dict[str, Any] = {"task": task.name, "metric": task.metric}
        if abs(task.weight) != 1:
            obj["weight"] = abs(task.weight)
        if task.weight < 0:
            obj["goal"] = "minimize"
        if cfg.limit is not None:
            obj["limit"] = cfg.limit
        if cfg.num_fewshot is not None:
            obj["num_fewshot"] = cfg.num_fewshot
        b.origin(("evolve", "objectives", len(objectives)), ("tasks", i))
        objectives.append(obj)
    if not objectives:
        raise b.doc.error(("tasks",), "the genome scores no task (every task has weight 0)")
    b.out.recipe["evolve"] = {
        "sampler": "cma" if dimensions > 1 else "tpe",
        "trials": DEFAULT_TRIALS,
        "seed": DEFAULT_SEED,
        "objectives": objectives,
        "apply_chat_template": cfg.apply_chat_template,
    }
    b.origin(("evolve",), ("tasks",))
    if cfg.shuffle:
        b.note("shuffle: true has no equivalent: lm-eval's document order is kept (limit takes the first documents)")
    if cfg.apply_chat_template and cfg.fewshot_as_multiturn and (cfg.num_fewshot or 0) > 0:
        b.note("fewshot_as_multiturn: few-shot examples are put in one user turn, not one turn each")


def _dimensions(genome: Any, groups: int) -> int:
    """The genotype's size: what the translation searches."""
    if genome.merge_method == "slerp":
        return groups
    method_params, _ = genome_tables()
    return groups * len(genome.models) * (len(genome.filters or []) + 1) * len(method_params[genome.merge_method])


def _unknown_keys(b: _Builder, cfg: Any) -> None:
    _, ModelGenomeDefinition = genome_tables()
    data = b.doc.data
    for key in data:
        if key not in type(cfg).model_fields:
            b.note(f"line {b.doc.line_of((key,))}: unknown key '{key}' is ignored (as mergekit-evolve does)")
    for key in data[GENOME_KEY]:
        if key not in ModelGenomeDefinition.model_fields:
            b.note(f"line {b.doc.line_of((GENOME_KEY, key))}: unknown key 'genome.{key}' is ignored "
                   "(as mergekit-evolve does)")


def translate_genome(doc: LocatedYaml, base_dir: Path, rebase: Callable[[str], str] = lambda m: m) -> GenomeTranslation:
    """The recipe equivalent to the genome file ``doc`` (local models relative to ``base_dir``)."""
    cfg = _validate(doc)
    genome = cfg.genome
    groups, layer_step = 1, 0
    if genome.layer_granularity > 0:
        num_layers = _num_layers(doc, genome, base_dir)
        if num_layers % genome.layer_granularity:
            raise doc.error(
                (GENOME_KEY, "layer_granularity"),
                f"layer_granularity {genome.layer_granularity} does not divide the {num_layers} layers "
                f"of '{genome.models[0]}'",
            )
        groups, layer_step = num_layers // genome.layer_granularity, genome.layer_granularity
    b = _Builder(doc, rebase)
    _unknown_keys(b, cfg)
    _config(b, cfg, groups, layer_step)
    _evolve(b, cfg, _dimensions(genome, groups))
    return b.out


def translate_genome_file(doc: LocatedYaml, base_dir: Path) -> GenomeTranslation:
    """``translate_genome`` for loading a genome as a recipe: what is not carried over is logged."""
    # absolute local paths, so the translation is also valid as a copy in the run folder
    translation = translate_genome(doc, base_dir, lambda m: resolve_model_path(m, base_dir))
    for note in translation.notes:
        LOG.warning("%s: %s", doc.source, note)
    LOG.info("%s is a mergekit-evolve genome file; searching its translation (see `mergekit-evolve migrate`)",
             doc.source)
    return translation


class _RecipeDumper(yaml.SafeDumper):
    """Block style, except annotations and short scalar lists (``{search: [0.0, 1.0]}``, layer ranges)."""


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True if is_annotation(data) else None)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(isinstance(v, (int, float, str, bool)) for v in data) and len(data) <= 4
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True if flat else None)


_RecipeDumper.add_representer(dict, _represent_dict)
_RecipeDumper.add_representer(list, _represent_list)


def recipe_text(translation: GenomeTranslation, genome_path: Path) -> str:
    """The translated recipe as a commented YAML file."""
    header = [
        f"# The recipe the mergekit-evolve genome file {genome_path.name} stands for "
        "(`mergekit-evolve migrate` writes it).",
        f"# mergekit-evolve defaults: pycma CMA-ES from x0 with sigma0 1/6, {DEFAULT_TRIALS} evaluations "
        f"(--max-fevals), seed {DEFAULT_SEED} (--random-seed).",
    ]
    header += [f"# Not carried over: {note}" for note in translation.notes]
    body = yaml.dump(translation.recipe, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, width=120)
    return "\n".join(header) + "\n" + body

