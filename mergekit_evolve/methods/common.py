"""What the mutation methods share: the task-arithmetic sum and a per-tensor random stream."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from mergekit.merge_methods import PerInputValues, TensorGroup


def weighted_task_vectors(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_j weights_j (tensors_j - base)`` with the very operations of mergekit's task_arithmetic
    (stacked deltas, multiplied in place, summed over the stack), so results match it bit for bit."""
    deltas = base.new_empty((len(tensors), *base.shape))
    for index, tensor in enumerate(tensors):
        torch.sub(tensor, base, out=deltas[index])
    factors = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > factors.dim():
        factors.unsqueeze_(-1)
    return deltas.mul_(factors).sum(dim=0)


def mutated_task_arithmetic(
    group: TensorGroup, weight: PerInputValues[float], mutate: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Task arithmetic whose merged task vector of each weight matrix passes through ``mutate``."""
    base = group.base.tensor
    if not group.non_base:
        return base
    delta = weighted_task_vectors(base, [e.tensor for e in group.non_base], [weight[e.id] for e in group.non_base])
    if mutate is not None and delta.dim() == 2:
        delta = mutate(delta)
    return (base + delta).to(base.dtype)


def tensor_generator(seed: int, tensor_name: str | None) -> torch.Generator:
    """A CPU generator for one tensor: the same (seed, tensor) draws the same numbers in any process."""
    digest = hashlib.sha256(f"{seed}:{tensor_name or ''}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
