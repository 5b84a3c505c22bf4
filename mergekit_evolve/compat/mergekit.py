"""mergekit's private surface this package relies on (tested against the installed version in tests/compat/)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import mergekit.merge
import transformers
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.graph import Task
from mergekit.io.tasks import LoaderCache, ReturnTensor
from mergekit.merge import _model_out_config
from mergekit.plan import MergePlanner


def out_config(config: MergeConfiguration, arch_info: Any,
               trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The merged model's config, as ``run_merge`` writes it."""
    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def run_merge_out_config(build: Any) -> Iterator[None]:
    """Inside: mergekit's ``run_merge`` builds its output config with ``build`` (``out_config``'s signature)."""
    original = mergekit.merge._model_out_config
    mergekit.merge._model_out_config = build
    try:
        yield
    finally:
        mergekit.merge._model_out_config = original


class WorkingReturnTensor(ReturnTensor):
    # mergekit 0.1.5 types this field as the parametrised ``Task[torch.Tensor]``, which pydantic
    # then tries to instantiate, so ``MergePlanner.plan_in_memory`` raises; a plain ``Task`` works.
    tensor_task: Task


# --- the planner's state between plan_tensor calls ---------------------------------------------


def planner_method(planner: MergePlanner) -> Any:
    """The merge method the planner plans with."""
    return planner._method


def planner_merges_tokenizer(planner: MergePlanner) -> bool:
    """Whether the plan includes a tokenizer merge (embeddings then depend on it)."""
    return planner._tokenizer_task is not None


def planned_tensors(planner: MergePlanner) -> list[tuple[Any, Task]]:
    """The (weight, task) pairs planned so far; ``plan_tensor`` appends to this list."""
    return planner._tensors


def plan_all(planner: MergePlanner) -> None:
    """Plan every tensor of the output model (what ``plan_in_memory`` does before building targets)."""
    planner._plan()


# --- reading configs and weights -----------------------------------------------------------------


@contextlib.contextmanager
def cached_model_configs(cache: dict[tuple[ModelReference, bool], transformers.PretrainedConfig]) -> Iterator[None]:
    """mergekit's planner re-reads every source's config.json several times per plan; within
    this block each is read once per process (callers get copies: mergekit edits them)."""
    original = ModelReference.config

    def config(self: ModelReference, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
        key = (self, trust_remote_code)
        if key not in cache:
            cache[key] = original(self, trust_remote_code=trust_remote_code)
        return copy.deepcopy(cache[key])

    ModelReference.config = config  # type: ignore[method-assign]
    try:
        yield
    finally:
        ModelReference.config = original  # type: ignore[method-assign]


def loader_cache(options: Any) -> dict[ModelReference, Any]:
    """mergekit's per-process loaders by model (its ``LoadTensor`` tasks read through them),
    set up for ``options``; a loader placed here serves every later merge in this process."""
    cache = LoaderCache()
    cache.setup(options)
    return cache.loaders


# --- mergekit's deprecated evolve module, for genome files --------------------------------------
# imported on use: it pulls in lm-eval and Ray's API (~4 s), and only genome files need it


def evol_merge_configuration() -> type:
    from mergekit.evo.config import EvolMergeConfiguration

    return EvolMergeConfiguration


def genome_tables() -> tuple[dict[str, list[str]], type]:
    """``METHOD_PARAM_MAPS`` (merge method -> the genotype's parameters) and ``ModelGenomeDefinition``."""
    from mergekit.evo.genome import METHOD_PARAM_MAPS, ModelGenomeDefinition

    return METHOD_PARAM_MAPS, ModelGenomeDefinition
