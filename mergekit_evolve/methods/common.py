"""What the mutation methods share: the task-arithmetic sum and a per-tensor random stream."""

from __future__ import annotations

import hashlib

import torch
from mergekit.merge_methods import PerInputValues, TensorGroup


def task_vector_sum(group: TensorGroup, weight: PerInputValues[float]) -> torch.Tensor:
    """``sum_j weight_j (theta_j - theta_base)``, computed as mergekit's task_arithmetic does (bit for bit)."""
    base = group.base.tensor
    entries = group.non_base
    deltas = base.new_empty((len(entries), *base.shape))
    for index, entry in enumerate(entries):
        deltas[index] = entry.tensor - base
    weights = torch.tensor([weight[e.id] for e in entries], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    return deltas.mul_(weights).sum(dim=0)


def tensor_generator(seed: int, tensor_name: str | None) -> torch.Generator:
    """A CPU generator for one tensor: the same (seed, tensor) draws the same numbers in any process."""
    digest = hashlib.sha256(f"{seed}:{tensor_name or ''}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
