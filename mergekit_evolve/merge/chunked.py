"""Cache-blocked kernels for mergekit's linear and task_arithmetic, bit-identical to mergekit's.

mergekit 0.1.5 runs these methods as several full passes over memory per tensor (stacking
the inputs, a zeroed accumulator, one update per input, a division), and its per-call
overhead is too high to call it on small blocks. Every output element of these two methods
depends only on the same element of the inputs, so the very same torch operations, applied
block by block of rows with mergekit's resolved parameters, give the same bits while each
block's intermediates stay in the CPU cache. ``tests/test_engine_equals_mergekit.py`` checks
the equality against ``run_merge`` with blocks forced small. Anything else (other methods,
mixed dtypes, missing optional inputs, casts) runs mergekit's own code unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from mergekit.graph import Task

from mergekit_evolve.methods.common import weighted_task_vectors

DEFAULT_CHUNK_BYTES = 1 << 20
Kernel = Callable[[list[torch.Tensor], torch.Tensor], None]


def _linear_kernel(task: Any, inputs: list[torch.Tensor]) -> tuple[Kernel, torch.dtype]:
    # mirrors mergekit.merge_methods.linear.linear_merge on a batch of one group
    first = inputs[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([[task.input_parameters[m]["weight"] for m in task.model_order]], dtype=dtype)
    normalize = task.parameters["normalize"]

    def run(blocks: list[torch.Tensor], out: torch.Tensor) -> None:
        shape = (1,) * (blocks[0].ndim + 1)
        result = torch.zeros((1, *blocks[0].shape), dtype=dtype)
        for block, coefficient in zip(blocks, weight.unbind(1)):
            result.addcmul_(block.unsqueeze(0), coefficient.reshape(shape))
        if normalize:
            result.div_(weight.sum(dim=1).reshape(shape))
        out.copy_(result[0].to(first.dtype))

    return run, first.dtype


def _task_arithmetic_kernel(task: Any, inputs: list[torch.Tensor]) -> tuple[Kernel, torch.dtype]:
    # mirrors GeneralizedTaskArithmeticMerge.merge_group without sparsification or consensus
    base_index = list(task.model_order).index(task.base_model)
    others = [i for i in range(len(inputs)) if i != base_index]
    dtype = inputs[base_index].dtype
    weight_values = [task.input_parameters[task.model_order[i]]["weight"] for i in others]
    normalize, lam = task.parameters["normalize"], task.parameters["lambda"]
    # mergekit's divisor: the weights summed over the stack (kept as a tensor: same rounding)
    divisor = torch.tensor(weight_values, dtype=dtype).reshape(-1, *(1,) * inputs[base_index].ndim).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1

    def run(blocks: list[torch.Tensor], out: torch.Tensor) -> None:
        base = blocks[base_index]
        mixed = weighted_task_vectors(base, [blocks[i] for i in others], weight_values)
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        out.copy_((base + mixed).to(dtype))

    return run, dtype


KERNELS = {"linear": _linear_kernel, "task_arithmetic": _task_arithmetic_kernel}


class ChunkedMerge(Task[torch.Tensor]):
    inner: Task
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def arguments(self) -> dict[str, Task]:
        return self.inner.arguments()

    def group_label(self) -> str | None:
        return self.inner.group_label()

    def uses_accelerator(self) -> bool:
        return self.inner.uses_accelerator()

    def priority(self) -> int:
        return self.inner.priority()

    def execute(self, **kwargs: Any) -> torch.Tensor:
        task = self.inner
        tensors: dict[Any, torch.Tensor] = kwargs["tensors"]
        inputs = [tensors.get(m) for m in task.model_order]
        first = inputs[0]
        if (
            any(t is None for t in inputs)
            or task.dtype is not None
            or task.out_dtype is not None
            or not first.is_floating_point()
            or first.ndim < 1
            or any(t.shape != first.shape or t.dtype != first.dtype or t.device.type != "cpu" for t in inputs)
        ):
            return task.execute(**kwargs)
        kernel, out_dtype = KERNELS[task.method_name](task, inputs)
        out = torch.empty(first.shape, dtype=out_dtype)
        row_bytes = max(1, first[0].numel() * first.element_size()) if first.ndim > 1 else first.element_size()
        step = max(1, self.chunk_bytes // row_bytes)
        for start in range(0, first.shape[0], step):
            kernel([t[start : start + step] for t in inputs], out[start : start + step])
        return out


def chunk_if_possible(task: Task, chunk_bytes: int) -> Task:
    if getattr(task, "method_name", None) in KERNELS and chunk_bytes > 0:
        return ChunkedMerge(inner=task, chunk_bytes=chunk_bytes)
    return task
