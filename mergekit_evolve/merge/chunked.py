"""Fast paths for mergekit's linear and task_arithmetic, bit-identical to mergekit's.

mergekit 0.1.5 runs these methods as several full passes over memory per tensor (stacking
the inputs, a zeroed accumulator, one update per input, a division), and its per-call
overhead is too high to call it on small blocks. Every output element of these two methods
depends only on the same element of the inputs, so two faster paths give the same bits:

- the fused numba kernel (``fused.py``): one pass over memory; used once it gave torch's bits
  on a probe of awkward values (once per process and kind of call: method, dtype, input count,
  flags), as the CPU's instruction set decides what torch's kernels round and fuse;
- else the very same torch operations, applied block by block of rows with mergekit's resolved
  parameters, each block's intermediates staying in the CPU cache.

``tests/merge/test_fused_kernel.py`` and ``tests/merge/test_engine_equals_mergekit.py`` check both against
mergekit. Anything else (other methods, mixed dtypes, missing optional inputs, casts, more than
4 task vectors, whose fp32 sum torch reorders) runs mergekit's own code unchanged.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Task

from mergekit_evolve.methods.common import weighted_task_vectors

LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_TASK_VECTORS = 4  # torch sums 5+ stacked fp32 rows in a shape-dependent order
PROBE_SIZE = 20011  # odd: every thread's share ends in the kernel's scalar (not vectorised) tail
PROBE_WEIGHTS = (0.5, -0.25, 0.0, 1.75, 0.3)
PROBE_LAMBDA = 0.7


@functools.cache
def _fused() -> ModuleType | None:
    """The numba kernels, imported on first use (numba takes a while to import)."""
    try:
        from mergekit_evolve.merge import fused
    except (ImportError, RuntimeError) as error:  # no numba for this Python; or numba found no cache folder
        LOG.debug("fused merge kernels unavailable, using blocked torch kernels: %s", error)
        return None
    return fused


def _divisor(divisor: torch.Tensor | None) -> float | None:
    # x / 1 is x, bit for bit (NaNs included): skip the division (slow in wide registers)
    return None if divisor is None or divisor.item() == 1 else divisor.item()


class _Linear:
    """mergekit.merge_methods.linear.linear_merge on a batch of one group."""

    def __init__(self, weights: tuple[float, ...], normalize: bool, dtype: torch.dtype):
        self.dtype, self.count = dtype, len(weights)
        self.weight = torch.tensor([weights], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.denominator = self.weight.sum(dim=1) if normalize else None
        self.key = ("linear", dtype, len(weights), normalize)
        self.fused_arguments = (self.weight[0].tolist(), _divisor(self.denominator))

    def probe(self) -> _Linear:
        return _Linear(_probe_weights(self.count), self.denominator is not None, self.dtype)

    def torch_block(self, blocks: list[torch.Tensor], out: torch.Tensor) -> None:
        shape = (1,) * (blocks[0].ndim + 1)
        result = torch.zeros((1, *blocks[0].shape), dtype=self.weight.dtype)
        for block, coefficient in zip(blocks, self.weight.unbind(1), strict=False):
            result.addcmul_(block.unsqueeze(0), coefficient.reshape(shape))
        if self.denominator is not None:
            result.div_(self.denominator.reshape(shape))
        out.copy_(result[0].to(self.dtype))

    def fused(self, inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        _fused().linear(inputs, *self.fused_arguments, out)


class _TaskArithmetic:
    """GeneralizedTaskArithmeticMerge.merge_group without sparsification or consensus."""

    def __init__(
        self, base_index: int, weights: tuple[float, ...], normalize: bool, lam: float, dtype: torch.dtype, ndim: int
    ):
        self.base_index, self.weights, self.lam, self.dtype = base_index, weights, lam, dtype
        self.count = len(weights) + 1
        self.weight = torch.tensor(weights, dtype=dtype)  # mergekit's weights tensor, rounded to the inputs' format
        # mergekit's divisor: the weights summed over the stack (kept as a tensor: same rounding)
        self.divisor = self.weight.reshape(-1, *(1,) * ndim).sum(dim=0) if normalize else None
        if self.divisor is not None:
            self.divisor[self.divisor.abs() < 1e-8] = 1
        self.fused_arguments = (self.weight.tolist(), _divisor(self.divisor), lam if lam != 1 else None)
        self.key = ("task_arithmetic", dtype, self.count, normalize, lam != 1)

    def probe(self) -> _TaskArithmetic:
        lam = PROBE_LAMBDA if self.lam != 1 else 1.0
        return _TaskArithmetic(0, _probe_weights(self.count - 1), self.divisor is not None, lam, self.dtype, 1)

    def _split(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return inputs[self.base_index], [t for i, t in enumerate(inputs) if i != self.base_index]

    def torch_block(self, blocks: list[torch.Tensor], out: torch.Tensor) -> None:
        base, others = self._split(blocks)
        mixed = weighted_task_vectors(base, others, list(self.weights))
        if self.divisor is not None:
            mixed /= self.divisor
        if self.lam != 1:
            mixed *= self.lam
        out.copy_((base + mixed).to(self.dtype))

    def fused(self, inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        base, others = self._split(inputs)
        _fused().task_arithmetic(base, others, *self.fused_arguments, out)


Method = _Linear | _TaskArithmetic


@functools.lru_cache(maxsize=4096)
def _cached(kind: type[Method], *arguments: Any) -> Method:
    """One method object per distinct parameters, which tensors share: its small torch setup
    costs more than merging a small tensor."""
    return kind(*arguments)


def _method(task: Any, inputs: list[torch.Tensor | None]) -> Method | None:
    """``task`` as one of the fast paths' methods, or None where only mergekit's own code applies."""
    first = inputs[0]
    if (
        any(t is None for t in inputs)
        or not first.is_floating_point()
        or first.ndim < 1
        or any(t.shape != first.shape or t.dtype != first.dtype or t.device.type != "cpu" for t in inputs)
        # a dtype or out_dtype other than the inputs' would be a cast; the same one changes nothing
        or any(name is not None and dtype_from_name(name) != first.dtype for name in (task.dtype, task.out_dtype))
    ):
        return None
    if task.method_name == "linear":
        weights = tuple(task.input_parameters[m]["weight"] for m in task.model_order)
        return _cached(_Linear, weights, task.parameters["normalize"], first.dtype)
    base_index = list(task.model_order).index(task.base_model)
    if not 1 <= len(inputs) - 1 <= MAX_TASK_VECTORS:  # no task vector: mergekit returns the base itself
        return None
    weights = tuple(task.input_parameters[m]["weight"] for i, m in enumerate(task.model_order) if i != base_index)
    normalize, lam = task.parameters["normalize"], task.parameters["lambda"]
    return _cached(_TaskArithmetic, base_index, weights, normalize, lam, first.dtype, first.ndim)


def _probe_weights(count: int) -> tuple[float, ...]:
    return tuple(PROBE_WEIGHTS[i % len(PROBE_WEIGHTS)] for i in range(count))


def _probe_tensor(dtype: torch.dtype, generator: torch.Generator, n: int) -> torch.Tensor:
    """Random magnitudes over the format's range, with zeros of both signs, subnormals, infinities and NaNs."""
    info = torch.finfo(dtype)
    values = torch.randn(n, generator=generator, dtype=torch.float64)
    values *= torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * 4)
    special = torch.tensor([0.0, -0.0, info.smallest_normal, -info.smallest_normal, info.smallest_normal / 3,
                            -info.smallest_normal / 5, info.smallest_normal / 2**(info.bits // 2), info.max, -info.max,
                            float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    where = torch.randint(0, n, (n // 50,), generator=generator)
    values[where] = special[torch.randint(0, len(special), (len(where),), generator=generator)]
    return values.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: the same bits, or NaN in both (torch's own NaN bits vary between its code paths)."""
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return (a.view(bits) == b.view(bits)) | (a.isnan() & b.isnan())


_verdicts: dict[tuple, bool] = {}


def _fused_applies(method: Method) -> bool:
    """Whether the fused kernel gives torch's bits for this kind of call in this process (probed once)."""
    fused = _fused()
    if fused is None or method.dtype not in fused.DTYPES:
        return False
    verdict = _verdicts.get(method.key)
    if verdict is None:
        verdict = _verdicts[method.key] = _probe(method.probe())
    return verdict


def _probe(method: Method) -> bool:
    generator = torch.Generator().manual_seed(0)
    n = PROBE_SIZE
    inputs = [_probe_tensor(method.dtype, generator, n) for _ in range(method.count)]
    expected, got = torch.empty(n, dtype=method.dtype), torch.empty(n, dtype=method.dtype)
    method.torch_block(inputs, expected)
    try:
        method.fused(inputs, got)
    except Exception:  # a numba that cannot compile here is a reason to fall back, not to fail
        LOG.debug("fused kernel failed for %s; using blocked torch kernels", method.key, exc_info=True)
        return False
    same = _same(expected, got)
    if not bool(same.all()):
        i = int((~same).nonzero()[0])
        LOG.debug("fused kernel differs from torch for %s at %d of %d probe elements "
                  "(first: %r vs torch's %r from %s); "
                  "using blocked torch kernels", method.key, int((~same).sum()), n, got[i].item(), expected[i].item(),
                  [t[i].item() for t in inputs])
        return False
    return True


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
        return self.run_into(kwargs["tensors"], None)

    def run_into(self, tensors: dict[ModelReference, torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor, written into ``out`` (and ``out`` returned) when it fits: a contiguous
        CPU tensor of the result's shape and dtype; another ``out`` is ignored. Where neither fast
        path applies, whatever the wrapped mergekit task returns."""
        inputs = [tensors.get(m) for m in self.inner.model_order]
        method = _method(self.inner, inputs)
        if method is None:
            return self.inner.execute(tensors=tensors)
        first = inputs[0]
        fits = out is not None and out.shape == first.shape and out.dtype == method.dtype and out.device.type == "cpu"
        if not (fits and out.is_contiguous()):
            out = torch.empty(first.shape, dtype=method.dtype)
        if all(t.is_contiguous() for t in inputs) and _fused_applies(method):
            method.fused(inputs, out)
            return out
        row_bytes = max(1, first[0].numel() * first.element_size()) if first.ndim > 1 else first.element_size()
        step = max(1, self.chunk_bytes // row_bytes)
        for start in range(0, first.shape[0], step):
            method.torch_block([t[start : start + step] for t in inputs], out[start : start + step])
        return out


def chunk_if_possible(task: Task, chunk_bytes: int) -> Task:
    if getattr(task, "method_name", None) in ("linear", "task_arithmetic") and chunk_bytes > 0:
        return ChunkedMerge(inner=task, chunk_bytes=chunk_bytes)
    return task
