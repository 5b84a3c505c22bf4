"""One-pass CPU kernels for mergekit's linear and task_arithmetic, bit-identical to its torch ops.

mergekit computes these element-wise methods as a chain of whole-tensor torch ops, each a pass
over memory. These numba kernels read every input once and write the output once, and round
exactly where torch's CPU kernels round (checked against torch 2.13 on x86-64; the caller
re-checks on a probe tensor once per process):

- linear: ``acc = +0``; per input ``acc = fma(x, w, acc)`` in fp32 (fp64 for fp64 inputs), as
  torch's ``addcmul_`` contracts multiply and add; then ``acc / sum(w)``; one rounding to the
  input format at the end.
- task_arithmetic, in the inputs' format ``T`` (for bf16/fp16: fp32 arithmetic rounded to ``T``
  after each op): ``d = T(x - base)``, ``p = T(d * T(w))``, ``s = T(+0 + p_1 + p_2 + ...)`` with
  the sum accumulated in fp32 (torch's ``sum(dim=0)``; in this order for up to 4 rows only),
  ``s = T(s / divisor)``, ``s = T(s * lambda)`` with lambda in fp32 (fp64 for fp64 tensors),
  ``out = T(base + s)``.

bf16 and fp16 travel as their bits (numba has no half types): bf16 as uint16, fp16 as int16.
NaN payloads are not reproduced: torch itself gives different NaN bits in its vectorised body
and its scalar tail (e.g. bf16 0xFFFF vs 0x7FC0), so only "NaN here" is a stable fact.

The kernels run numba's ``prange`` over the threads torch uses; calls are serialised, as
numba's fallback thread pool (used where neither its OpenMP nor its TBB layer loads) aborts
the process on concurrent launches.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

import torch

# numba starts its OpenMP pool with this many threads (read when numba is imported). Its idle
# threads spin after every kernel; with several worker processes of one thread each, the pool's
# extra threads took the cores from the other workers' forward passes (2 workers on the demo:
# 2.3 s an evaluation instead of 0.9 s). This module is imported at the first merge, after the
# worker has set torch's thread count.
os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

# numba's default error model raises ZeroDivisionError; torch divides as IEEE does
JIT = {"cache": True, "error_model": "numpy", "nogil": True}


@intrinsic
def _fma(typingctx, a, b, c):
    # LLVM contracts a multiply and an add only when asked; torch's addcmul_ does contract
    if isinstance(a, types.Float) and a == b == c:
        return a(a, b, c), lambda context, builder, sig, args: builder.fma(*args)
    return None


def _unary(arg: types.Type, result: types.Type, build: Callable[[ir.IRBuilder, ir.Value], ir.Value]):
    """An intrinsic ``result(arg)`` whose LLVM IR ``build`` emits."""

    @intrinsic
    def op(typingctx, x):
        if x == arg:
            return result(x), lambda context, builder, sig, args: build(builder, args[0])
        return None

    return op


I16, I32, F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


def _bf16_rounded(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """``v``'s bits rounded to nearest even at bit 16, as an i32 (whose low 16 bits are then 0).

    A NaN stays a NaN if its low 16 bits are 0, as every NaN in these kernels has: decoded from
    bf16, or the CPU's default NaN, or either propagated."""
    u = b.bitcast(v, I32)
    return b.and_(b.add(b.add(u, I32(0x7FFF)), b.and_(b.lshr(u, I32(16)), I32(1))), I32(0xFFFF0000))


def _bf16_bits(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    # any NaN becomes 0xFFFF, as in torch's vectorised conversion
    rounded = b.lshr(_bf16_rounded(b, v), I32(16))
    return b.trunc(b.select(b.fcmp_unordered("uno", v, v), I32(0xFFFF), rounded), I16)


_bf16_to_f32 = _unary(types.uint16, types.float32, lambda b, x: b.bitcast(b.shl(b.zext(x, I32), I32(16)), F32))
_f32_to_bf16 = _unary(types.float32, types.uint16, _bf16_bits)
# one bf16 op's rounding, kept in fp32: the stored form's NaN select is not needed there
_bf16_round = _unary(types.float32, types.float32, lambda b, v: b.bitcast(_bf16_rounded(b, v), F32))
# LLVM's half conversions are the hardware's (F16C), which torch's vectorised kernels use
_f16_to_f32 = _unary(types.int16, types.float32, lambda b, x: b.fpext(b.bitcast(x, ir.HalfType()), F32))
_f32_to_f16 = _unary(types.float32, types.int16, lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), I16))


def _load(x):
    """A stored element as the value torch computes with (fp32 for the half formats)."""


def _store(v, out):
    """``v`` rounded to ``out``'s element format, as stored."""


def _round(v, out):
    """``v`` rounded to ``out``'s element format and back: one torch op's result."""


@overload(_load)
def _load_impl(x):
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    if x == types.int16:
        return lambda x: _f16_to_f32(x)
    if isinstance(x, types.Float):
        return lambda x: x
    return None


@overload(_store)
def _store_impl(v, out):
    if out.dtype == types.uint16:
        return lambda v, out: _f32_to_bf16(v)
    if out.dtype == types.int16:
        return lambda v, out: _f32_to_f16(v)
    if isinstance(out.dtype, types.Float):
        return lambda v, out: v
    return None


@overload(_round)
def _round_impl(v, out):
    if out.dtype == types.uint16:
        return lambda v, out: _bf16_round(v)
    return lambda v, out: _load(_store(v, out))


@njit(parallel=True, **JIT)
def _linear(inputs, weights, denominator, normalize, out):
    zero = np.zeros(1, weights.dtype)[0]
    for j in prange(out.size):  # from 0: numba then knows j >= 0 and drops negative-index checks
        acc = zero
        for k in range(len(inputs)):  # a fixed count per compiled kernel: LLVM unrolls it
            acc = _fma(_load(inputs[k][j]), weights[k], acc)
        if normalize:
            acc = acc / denominator
        out[j] = _store(acc, out)


@njit(parallel=True, **JIT)
def _task_arithmetic(base, others, weights, divisor, normalize, lam, scale, out):
    zero = np.zeros(1, weights.dtype)[0]
    for j in prange(out.size):
        b = _load(base[j])
        acc = zero
        for k in range(len(others)):
            delta = _round(_load(others[k][j]) - b, out)
            acc += _round(delta * weights[k], out)
        mixed = _round(acc, out)
        if normalize:
            mixed = _round(mixed / divisor, out)
        if scale:
            mixed = _round(mixed * lam, out)
        out[j] = _store(b + mixed, out)


_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (the half formats as their bits)."""
    bits = _BITS.get(t.dtype)
    return (t if bits is None else t.view(bits)).numpy().reshape(-1)


def _opmath(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


_launch = threading.Lock()


def _run(kernel: Callable[..., None], *args: object) -> None:
    with _launch:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)


def linear(inputs: Sequence[torch.Tensor], weights: Sequence[float], denominator: float | None,
           out: torch.Tensor) -> None:
    """``out = T(sum_i fma(x_i, w_i)) [/ denominator]`` for contiguous CPU tensors of one format.

    ``weights`` and ``denominator`` are already in mergekit's coefficient dtype (fp32, fp64 for
    fp64 inputs)."""
    opmath = _opmath(out.dtype)
    _run(
        _linear, tuple(_array(t) for t in inputs), np.asarray(weights, dtype=opmath),
        opmath(1 if denominator is None else denominator), denominator is not None, _array(out),
    )


def task_arithmetic(
    base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float],
    divisor: float | None, lam: float | None, out: torch.Tensor,
) -> None:
    """mergekit's task_arithmetic (no sparsification, no consensus) of contiguous CPU tensors of one format.

    ``weights`` and ``divisor`` are already rounded to the tensors' format; ``lam`` is the
    Python float torch receives (it computes with it in fp32, fp64 for fp64 tensors)."""
    opmath = _opmath(out.dtype)
    _run(
        _task_arithmetic, _array(base), tuple(_array(t) for t in others), np.asarray(weights, dtype=opmath),
        opmath(1 if divisor is None else divisor), divisor is not None,
        opmath(1 if lam is None else lam), lam is not None, _array(out),
    )
