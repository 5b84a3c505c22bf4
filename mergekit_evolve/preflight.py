"""What can be known wrong before any weight is loaded: checked by ``--dry-run`` and by every run.

Reads each source's ``config.json`` and safetensors headers (no tensors), asks mergekit's
architecture detection what each model is, and asks lm-eval's registry for every task,
metric, filter and split. Each problem is one ``file:line: ...`` naming the recipe line and
the model or file concerned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from mergekit import merge_methods
from mergekit.architecture import ModelArchitecture, arch_info_for_config
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.merge_methods.base import BasePolicy
from mergekit.options import MergeOptions
from safetensors import safe_open
from transformers import PretrainedConfig

from mergekit_evolve.evaluate.suite import (
    TaskSetupError,
    TaskSuite,
    check_indexed,
    make_scorer,
    task_manager,
)
from mergekit_evolve.merge.resident import (
    ModelNotFoundError,
    WeightsError,
    local_folder,
)
from mergekit_evolve.recipe import routing
from mergekit_evolve.recipe.annotations import get_at, is_annotation, walk
from mergekit_evolve.recipe.evolve_settings import ExampleObjective, JudgeObjective, TaskObjective
from mergekit_evolve.recipe.parse import Recipe
from mergekit_evolve.recipe.yaml_lines import Loc, RecipeError
from mergekit_evolve.study.worker import attach_references, reference_source, source_models

LOG = logging.getLogger(__name__)
# what AutoTokenizer reads a tokenizer from (any one is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class SourceModel:
    """One source as the checks see it: folder, config, architecture and tensor shapes (headers only)."""

    def __init__(self, ref: ModelReference, loc: Loc, folder: str, config: PretrainedConfig,
                 arch: ModelArchitecture | None, shapes: dict[str, tuple[int, ...]] | None, base_dir: Path):
        self.ref, self.loc, self.folder, self.config, self.arch, self.shapes = ref, loc, folder, config, arch, shapes
        self.base_dir = base_dir

    @property
    def name(self) -> str:
        """As the recipe's reader knows it: relative to the recipe's folder when inside it."""
        path = str(self.ref.model.path)
        if os.path.isabs(path) and Path(path).is_relative_to(self.base_dir):
            return os.path.relpath(path, self.base_dir)
        return path

    @property
    def arch_name(self) -> str:
        return (self.config.architectures or ["?"])[0]

    def depth(self) -> int | None:
        if self.arch is None or "default" not in self.arch.modules:
            return getattr(self.config, "num_hidden_layers", None)
        return self.arch.modules["default"].architecture.num_layers(self.config)


def model_locs(recipe: Recipe) -> dict[str, Loc]:
    """Model path -> the first recipe location that names it (``model:``, ``base_model:``, routing)."""
    out: dict[str, Loc] = {}
    for loc, value in walk(recipe.template):
        if not isinstance(value, str) or not loc:
            continue
        named = loc[-1] in ("model", "base_model") or (len(loc) >= 2 and loc[-2] in ("models", "sources")
                                                         and isinstance(loc[-1], int))
        if named or (len(loc) == 3 and loc[0] == routing.KEY and loc[1] == "models"):
            out.setdefault(ModelReference.model_validate(value).model.path, loc)
    return out


def read_shapes(folder: str, allow_pickle: bool) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape from the safetensors headers (memory-mapped, no tensor read); None for pickles."""
    try:
        index = ShardedTensorIndex.from_disk(folder)
    except RuntimeError:
        raise WeightsError(f"no model.safetensors (or index) in {folder}") from None
    except Exception as e:  # a single model.safetensors is opened to list its tensors
        raise WeightsError(f"{os.path.join(folder, 'model.safetensors')}: not a readable safetensors file "
                           f"({e})") from None
    if not index.is_safetensors:
        if not allow_pickle:
            raise WeightsError(f"only pickle checkpoints in {folder}; pickles can run code when loaded. "
                               "Convert it to safetensors, or pass --allow-pickle if you trust it.")
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in index.shards:
        file = os.path.join(index.base_path, shard.filename)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # SafetensorError, OSError: the file is what is wrong
            raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    return shapes


def _available(ref: ModelReference) -> bool:
    """A local path (missing ones too: that is the error to report), or a Hub model in the local cache."""
    path = ref.model.path
    # "gpt2" is a Hub id too
    if os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or os.path.isdir(path):
        return True
    return isinstance(try_to_load_from_cache(path, "config.json", revision=ref.model.revision), str)


def inspect_source(recipe: Recipe, ref: ModelReference, loc: Loc, options: MergeOptions,
                   allow_pickle: bool) -> SourceModel:
    def fail(message: str) -> RecipeError:
        return recipe.error(loc, message)

    try:
        folder = local_folder(ref, options)
        shapes = read_shapes(folder, allow_pickle)
    except ModelNotFoundError as e:
        raise fail(str(e)) from None
    except WeightsError as e:
        raise fail(f"model '{ref}': {e}") from None
    try:
        config = ref.config(trust_remote_code=options.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError for a bad config.json
        raise fail(f"model '{ref}': cannot read {os.path.join(folder, 'config.json')}: {e}") from None
    try:
        arch = arch_info_for_config(config)
    except RuntimeError as e:
        raise fail(f"model '{ref}': {e}") from None
    return SourceModel(ref, loc, folder, config, arch, shapes, recipe.base_dir)


def check_sources(recipe: Recipe, options: MergeOptions, allow_pickle: bool = False,
                  pending: Iterable[Path] = (), offline: bool = False) -> list[SourceModel]:
    """Every source's files, architecture, shapes and layer ranges; ``pending`` are folders an earlier
    stage will write; ``offline`` skips Hub models not downloaded yet."""
    locs = model_locs(recipe)
    skip = {str(p) for p in pending}
    refs = [ref for ref in source_models(recipe) if ref.model.path not in skip]
    if offline:
        absent = [ref for ref in refs if not _available(ref)]
        for ref in absent:
            LOG.info("model %s is not downloaded yet: the run checks it once it has fetched it", ref)
        refs = [ref for ref in refs if ref not in absent]
    sources = [inspect_source(recipe, ref, locs.get(ref.model.path, ()), options, allow_pickle) for ref in refs]
    _check_base_model(recipe)
    if not sources:
        return sources
    allow_crimes = bool(recipe.evolve and recipe.evolve.allow_crimes)
    first = sources[0]
    for s in sources[1:]:
        if s.arch is not None and first.arch is not None and s.arch != first.arch and not allow_crimes:
            raise recipe.error(s.loc, f"model '{s.name}' is {s.arch_name} but '{first.name}' is {first.arch_name}; "
                                      "mergekit does not mix architectures unless evolve.allow_crimes is true")
        if s.arch == first.arch:
            _check_shapes(recipe, first, s)
    _check_layer_ranges(recipe, {str(s.ref.model.path): s for s in sources})
    _check_tokenizer(recipe, sources)
    return sources


def _check_shapes(recipe: Recipe, first: SourceModel, other: SourceModel) -> None:
    if first.shapes is None or other.shapes is None:
        return
    vocab = set()  # mergekit aligns vocabularies (tokenizer_source); other axes must agree
    for s in (first, other):
        if s.arch is not None:
            vocab |= {w.name for w in s.arch.all_weights(s.config) if w.vocabulary_axis is not None}
    for name, shape in other.shapes.items():
        if name in first.shapes and name not in vocab and first.shapes[name] != shape:
            raise recipe.error(other.loc, f"model '{other.name}' has tensor '{name}' of shape {list(shape)}, but "
                                          f"'{first.name}' has {list(first.shapes[name])}: they cannot be merged")


def _layer_bounds(recipe: Recipe, loc: Loc, value: Any) -> list[int]:
    """The largest value a ``layer_range`` bound at ``loc`` can take (searched bounds: their upper limit)."""
    if not is_annotation(value):
        return [int(value)] if isinstance(value, int) else []
    out = []
    for placement in recipe.search_space.placements:
        if placement.loc == loc:
            for d in placement.dims:
                dim = recipe.search_space.dimensions[d]
                out += ([int(c[1] if isinstance(c, list) else c) for c in dim.choices] if dim.choices
                        else [int(dim.high)])
    return out


def _check_layer_ranges(recipe: Recipe, by_path: dict[str, SourceModel]) -> None:
    for loc, value in walk(recipe.template):
        if not loc or loc[-1] != "layer_range" or loc[0] == routing.KEY:
            continue
        entry = get_at(recipe.template, loc[:-1])
        model = entry.get("model") if isinstance(entry, dict) else None
        source = by_path.get(ModelReference.model_validate(model).model.path) if isinstance(model, str) else None
        depth = source.depth() if source else None
        if depth is None:
            continue
        if is_annotation(value):
            ends = _layer_bounds(recipe, loc, value)
        elif isinstance(value, list) and len(value) == 2:
            ends = _layer_bounds(recipe, loc + (1,), value[1])
        else:
            continue
        if ends and max(ends) > depth:
            searched = is_annotation(value) or is_annotation(value[1])
            what = f"its searched end reaches {max(ends)}" if searched else f"it ends at {max(ends)}"
            raise recipe.error(loc, f"layer_range of '{source.name}': {what}, but the model has {depth} layers")


def _check_base_model(recipe: Recipe) -> None:
    known = {m.spec.name: m for m in merge_methods.registered_methods()}
    method = recipe.template.get("merge_method")
    names = recipe.search_space.dimensions["merge_method"].choices if is_annotation(method) else (method,)
    has_base = bool(recipe.template.get("base_model"))
    for name in names:
        policy = known[name].spec.contract.base
        if policy == BasePolicy.REQUIRED and not has_base:
            raise recipe.error(("merge_method",), f"merge method {name} needs a base_model; the recipe names none")


def _check_tokenizer(recipe: Recipe, sources: list[SourceModel]) -> None:
    """The tokenizer the search scores with comes from the base model (else the first source)."""
    donor = sources[0]
    if not any(os.path.exists(os.path.join(donor.folder, f)) for f in TOKENIZER_FILES):
        raise recipe.error(donor.loc, f"model '{donor.name}' has no tokenizer ({', '.join(TOKENIZER_FILES)}) in "
                                      f"{donor.folder}; the search scores with its tokenizer")


def objective_loc(recipe: Recipe, task: str | None) -> Loc:
    """The recipe line of the objective that names ``task`` (the objectives list when none does)."""
    assert recipe.evolve is not None
    for i, obj in enumerate(recipe.evolve.objectives):
        if not isinstance(obj, TaskObjective):
            continue
        if task == obj.task:
            return ("evolve", "objectives", i, "task")
        if task == obj.heldout_task:
            return ("evolve", "objectives", i, "heldout_task")
    return ("evolve", "objectives")


def _task_error(recipe: Recipe, e: TaskSetupError, index: int | None = None) -> RecipeError:
    if e.field == "task_paths":
        return recipe.error(("evolve", "task_paths"), str(e))
    if index is None:
        return recipe.error(objective_loc(recipe, e.task), str(e))
    obj = recipe.evolve.objectives[index]
    # other kinds' messages start with their field: placed under the objective, they name the recipe key
    message = str(e) if isinstance(obj, TaskObjective) else f"evolve.objectives[{index}].{e}"
    return recipe.error(("evolve", "objectives", index, e.field or obj.field), message)


def check_tasks(recipe: Recipe, load: bool = True) -> TaskSuite | None:
    """Every objective's tasks, metrics and filters as lm-eval's index has them; with ``load``, the
    tasks loaded too (their data: each split must have examples), as the suite the worker reuses.
    Other objectives' data, code and reward model configs are checked either way (no weights load)."""
    assert recipe.evolve is not None
    for i, obj in enumerate(recipe.evolve.objectives):
        if isinstance(obj, ExampleObjective):
            try:
                make_scorer(obj, recipe.evolve, recipe.base_dir).check()
                if isinstance(obj, JudgeObjective) and obj.mode == "pairwise":
                    reference_source(recipe, obj)
            except TaskSetupError as e:
                raise _task_error(recipe, e, i) from None
    try:
        manager = task_manager(recipe.evolve, recipe.base_dir)
    except TaskSetupError as e:
        raise _task_error(recipe, e) from None
    for i, obj in enumerate(recipe.evolve.objectives):
        if not isinstance(obj, TaskObjective):
            continue
        try:
            check_indexed(obj, manager)
        except TaskSetupError as e:
            raise _task_error(recipe, e, i) from None
    if not load:
        return None
    try:
        suite = TaskSuite(recipe.evolve, recipe.base_dir)
    except TaskSetupError as e:
        raise _task_error(recipe, e) from None
    for i, obj in enumerate(recipe.evolve.objectives):
        try:
            suite.check(obj)
        except TaskSetupError as e:
            raise _task_error(recipe, e, i) from None
    return suite


def check_recipe(recipe: Recipe, options: MergeOptions, allow_pickle: bool = False,
                 pending: Iterable[Path] = (), dry_run: bool = False) -> TaskSuite | None:
    """All checks; the task suite they loaded (for the worker to reuse), or None.

    ``dry_run`` downloads nothing: a Hub model not in the local cache, and the tasks' data, are
    checked when the run fetches them."""
    check_sources(recipe, options, allow_pickle, pending, offline=dry_run)
    suite = check_tasks(recipe, load=not dry_run) if recipe.evolve else None
    if suite is not None:  # the pairwise judges' reference folders join the files the run hashes
        attach_references(recipe, suite, options)
    return suite
