"""Materialise a mergekit config into one resident transformers model, without touching disk.

The tensors come from mergekit's own planner (``MergePlanner.plan_in_memory``) and executor,
so they are the ones ``run_merge`` would write; only the destination differs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from mergekit.architecture import WeightInfo, get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task
from mergekit.io.tasks import ReturnTensor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.parameter_resolver import resolve_parameters
from mergekit.plan import MergePlanner
from pydantic import TypeAdapter
from transformers.initialization import no_init_weights

from mergekit_evolve.compat.mergekit import (
    WorkingReturnTensor,
    cached_model_configs,
    plan_all,
    planned_tensors,
    planner_merges_tokenizer,
    planner_method,
)
from mergekit_evolve.merge.architecture_memo import memoised
from mergekit_evolve.merge.chunked import (
    DEFAULT_CHUNK_BYTES,
    ChunkedMerge,
    chunk_if_possible,
)
from mergekit_evolve.merge.layer_types import out_config
from mergekit_evolve.merge.resident import make_resident
from mergekit_evolve.methods.registry import register_plugins

LOG = logging.getLogger(__name__)
MAX_RESIDENT_SHAPES = 2


_PARAMETERS = TypeAdapter(ExecuteMergeMethodTask.model_fields["parameters"].annotation)
_INPUT_PARAMETERS = TypeAdapter(ExecuteMergeMethodTask.model_fields["input_parameters"].annotation)
MAX_TEMPLATES = 100_000


class InMemoryPlanner(MergePlanner):
    """``MergePlanner`` whose in-memory plan builds (working) ``ReturnTensor`` targets.

    With ``templates`` (a dict kept across plans), a tensor whose inputs were planned before
    reuses that task and only re-resolves its parameters: building and validating each
    tensor's pydantic task graph is half of a small model's planning, and between two trials
    of one recipe only the parameter values differ.
    """

    chunk_bytes: int = 0
    templates: dict[tuple, ExecuteMergeMethodTask | None] | None = None

    def plan_tensor(self, weight: WeightInfo, weights_in: list[WeightInfo], models: list[ModelReference],
                    cfg_reader: Any) -> None:
        if self.templates is None or planner_merges_tokenizer(self):
            return super().plan_tensor(weight, weights_in, models, cfg_reader)
        # everything plan_tensor builds the task from, except the parameters (models by name:
        # comparing pydantic ModelReferences field by field would cost what the template saves)
        key = (
            planner_method(self).spec.name, self.config.dtype, self.options.read_to_gpu and self.options.device,
            self.options.unsafe_truncate_embeddings, weight, tuple(weights_in),
            *map(str, (*models, cfg_reader.base_model)),
        )
        if key not in self.templates:
            if len(self.templates) >= MAX_TEMPLATES:  # many DFS paths: keep memory bounded
                self.templates.clear()
            tensors = planned_tensors(self)
            planned = len(tensors)
            super().plan_tensor(weight, weights_in, models, cfg_reader)
            # None: an optional weight no input has, skipped (that depends on the inputs only)
            self.templates[key] = tensors[-1][1] if len(tensors) > planned else None
            return
        template = self.templates[key]
        if template is None:
            return
        # the call plan_tensor makes, so filters, gradients and defaults resolve exactly as there
        global_params, tensor_params = resolve_parameters(
            planner_method(self).spec,
            tensor_name=weight.name,
            inputs={model: w.name for model, w in zip(models, weights_in, strict=False)},
            sources=cfg_reader.parameter_sources,
            base_model=cfg_reader.base_model,
            t=cfg_reader.t,
        )
        task = template.model_copy(update={
            "parameters": _PARAMETERS.validate_python(global_params),
            "input_parameters": _INPUT_PARAMETERS.validate_python(tensor_params),
        })
        planned_tensors(self).append((weight, task))

    def plan_in_memory(self) -> list[ReturnTensor]:
        plan_all(self)
        return [
            WorkingReturnTensor(
                weight_info=w, tensor_task=chunk_if_possible(t, self.chunk_bytes),
                dtype=w.force_dtype or self.config.out_dtype,
            )
            for w, t in planned_tensors(self)
        ]


def _evaluate(task: Task) -> Any:
    """A task's value computed depth first: for the small, pure input graph of one merged
    tensor (gather <- loads from resident memory) this is what the Executor computes, without
    building and sorting a schedule of the whole model's graph."""
    return task.execute(**{name: _evaluate(arg) for name, arg in task.arguments().items()})


@dataclass
class _Resident:
    """One output shape's resident model and what the engine keeps with it."""

    model: transformers.PreTrainedModel
    state: dict[str, torch.Tensor]  # its tensors by name
    # outputs the fused kernels write into: owned here, so an in-place write never touches a source tensor
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    complete: bool = False  # a merge has written every tensor (checked once)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class InMemoryMerger:
    """Holds the source tensors and one model per output shape; writes each candidate into it."""

    def __init__(self, options: MergeOptions, allow_pickle: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        register_plugins()  # stored configs may name this package's merge methods
        self.options = options
        self.allow_pickle = allow_pickle
        # Chunking pays on the CPU's caches; a GPU runs whole tensors at full bandwidth.
        self.chunk_bytes = chunk_bytes if torch.device(options.device or "cpu").type == "cpu" else 0
        self.device = options.device or "cpu"
        on_gpu = torch.device(self.device).type != "cpu"
        self.storage_device = self.device if on_gpu else "cpu"
        self._resident: dict[str, _Resident] = {}  # by output shape
        self._arch: dict[tuple, Any] = {}
        self._configs: dict[tuple[ModelReference, bool], transformers.PretrainedConfig] = {}
        self._templates: dict[tuple, Any] = {}  # tensor tasks by their inputs (see InMemoryPlanner)

    def _shape_key(self, cfg_out: transformers.PretrainedConfig) -> str:
        diff = {k: v for k, v in cfg_out.to_diff_dict().items()
                if k not in ("dtype", "torch_dtype", "transformers_version")}
        return json.dumps(diff, sort_keys=True, default=str)

    def _dtype(self, config: MergeConfiguration, cfg_out: transformers.PretrainedConfig) -> torch.dtype:
        name = config.out_dtype or config.dtype
        if name:
            return dtype_from_name(name)
        dtype = getattr(cfg_out, "dtype", None) or getattr(cfg_out, "torch_dtype", None)
        if isinstance(dtype, str):
            return dtype_from_name(dtype)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _resident_for(self, config: MergeConfiguration) -> tuple[_Resident, Any, Any]:
        models = tuple(sorted(config.referenced_models(), key=str))
        with cached_model_configs(self._configs):
            if models not in self._arch:  # architecture detection: once per model set, not per trial
                self._arch[models] = memoised(get_architecture_info(config, self.options))
            arch_info = self._arch[models]
            cfg_out = out_config(config, arch_info, trust_remote_code=self.options.trust_remote_code)
        key = self._shape_key(cfg_out)
        resident = self._resident.get(key)
        if resident is None:
            if len(self._resident) >= MAX_RESIDENT_SHAPES:
                # DFS paths vary in length; keep memory bounded by the last few shapes only
                del self._resident[next(iter(self._resident))]
            dtype = self._dtype(config, cfg_out)
            LOG.info("instantiating the resident model (%s, %s) on %s", cfg_out.model_type, dtype, self.device)
            with no_init_weights():
                model = transformers.AutoModelForCausalLM.from_config(
                    cfg_out, dtype=dtype, trust_remote_code=self.options.trust_remote_code
                )
            model.tie_weights()  # no_init_weights also skips tying (transformers 5): lm_head would stay empty
            model = model.to(self.device).eval().requires_grad_(False)
            resident = self._resident[key] = _Resident(model, model.state_dict(keep_vars=True))
        return resident, arch_info, cfg_out

    def plan(self, config: MergeConfiguration) -> tuple[_Resident, Any, list[ReturnTensor]]:
        """The resident model of ``config``'s output shape, its output config, and mergekit's
        plan of every merged tensor (the sources must be resident already)."""
        resident, arch_info, cfg_out = self._resident_for(config)
        # The planner normalises the config in place; keep the caller's copy intact.
        planner = InMemoryPlanner(config.model_copy(deep=True), arch_info, self.options, cfg_out)
        planner.chunk_bytes, planner.templates = self.chunk_bytes, self._templates
        with cached_model_configs(self._configs):
            return resident, cfg_out, planner.plan_in_memory()

    def materialize(self, config: MergeConfiguration) -> transformers.PreTrainedModel:
        """Compute ``config``'s merged tensors straight into the resident model and return it."""
        make_resident(config.referenced_models(), self.options, self.storage_device, self.allow_pickle)
        resident, cfg_out, targets = self.plan(config)
        state, buffers = resident.state, resident.buffers
        if self.options.random_seed is not None:
            transformers.trainer_utils.set_seed(self.options.random_seed)  # as run_merge does
        written: set[str] = set()
        # Merges the fused kernels compute go straight into owned buffers; only the rest (other
        # methods, routing, GPU) pays for mergekit's scheduler.
        direct = [t for t in targets if isinstance(t.tensor_task, ChunkedMerge)]
        scheduled = [t for t in targets if not isinstance(t.tensor_task, ChunkedMerge)]
        with torch.no_grad():
            for task in direct:
                target = self._target(state, task, cfg_out)
                if target is None:
                    continue
                name = task.weight_info.name
                buffer = buffers.get(name)
                if buffer is None:
                    buffer = buffers[name] = torch.empty_like(target.data)
                merged = task.tensor_task
                value = task.execute(tensor=merged.run_into(_evaluate(merged.arguments()["tensors"]), buffer))
                self._bind(target, value, name)
                written.add(name)
            if scheduled:
                executor = Executor(scheduled, math_device=self.device, storage_device=self.storage_device)
                for task, value in executor.run(quiet=True):
                    assert isinstance(task, ReturnTensor)
                    target = self._target(state, task, cfg_out)
                    if target is not None:
                        self._bind(target, value, task.weight_info.name)
                        written.add(task.weight_info.name)
        if not resident.complete:
            written_params = {id(p) for n, p in resident.model.named_parameters(remove_duplicate=False) if n in written}
            missing = [n for n in state if n not in written and id(state[n]) not in written_params]
            if missing:
                raise RuntimeError(f"the merge produced no value for {missing[:5]} (of {len(missing)} missing tensors)")
            resident.complete = True
        return resident.model

    @staticmethod
    def _target(state: dict[str, torch.Tensor], task: ReturnTensor, cfg_out: Any) -> torch.Tensor | None:
        """The resident tensor a merged tensor belongs in (None: an optional tensor the model lacks)."""
        name = task.weight_info.name
        target = state.get(name)
        if target is None:
            target = next((state[a] for a in task.weight_info.aliases or () if a in state), None)
        if target is None and not task.weight_info.optional:
            raise RuntimeError(f"merged tensor '{name}' has no place in the {cfg_out.model_type} model")
        return target

    @staticmethod
    def _bind(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if target.shape != value.shape:
            raise RuntimeError(f"merged tensor '{name}' has shape {tuple(value.shape)}, "
                               f"model expects {tuple(target.shape)}")
        # Rebind, never copy in place: saves a pass over memory, and a passthrough result
        # may be a resident source tensor itself, which an in-place write would corrupt.
        target.data = value.to(device=target.device, dtype=target.dtype).contiguous()
