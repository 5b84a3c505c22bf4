"""What the mutation methods share: the task-arithmetic sum and a per-tensor random stream."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

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


# mutate(delta, seed, scale) -> the mutated task vector of one weight matrix
Mutate = Callable[[torch.Tensor, int, float], torch.Tensor]


def mutated_task_arithmetic(
    group: TensorGroup, weight: PerInputValues[float], mutate: Mutate, seed: int, scale: float, lineage: str = "",
) -> torch.Tensor:
    """Task arithmetic whose merged task vector of each weight matrix passes through ``mutate``
    (when ``scale`` > 0), plus the mutated ancestors ``lineage`` names.

    ``lineage`` (JSON, written by the CycleQD sampler) lets a child inherit its parents' mutations:
    ``{"mix": [[ref, coef], ...], "nodes": {ref: node}}``; a node is an earlier individual,
    ``{"weights": {model: coef}, "mix": [...], "mutation": [seed, scale] | null}``, whose task
    vector is rebuilt here from the experts' tensors exactly as its own merge computed it
    (weighted experts, plus its own mix, then its mutation). The child's task vector is its
    weighted experts plus ``sum coef * tau(ref)`` over its mix, then its own mutation.
    """
    base = group.base.tensor
    if not group.non_base:
        return base
    tree = json.loads(lineage) if lineage else {"mix": [], "nodes": {}}
    memo: dict[str, torch.Tensor] = {}

    def individual(weights: dict[str, float], mix: list[list[Any]], mutation: list[Any] | None) -> torch.Tensor:
        delta = weighted_task_vectors(base, [e.tensor for e in group.non_base],
                                      [weights.get(str(e.id), 0.0) for e in group.non_base])
        for ref, coef in mix:
            delta = delta + coef * node(ref)
        if mutation is not None and mutation[1] > 0 and delta.dim() == 2:
            delta = mutate(delta, int(mutation[0]), float(mutation[1]))
        return delta

    def node(ref: str) -> torch.Tensor:
        if ref not in memo:  # an ancestor shared by both parents is rebuilt once
            spec = tree["nodes"][ref]
            memo[ref] = individual(spec["weights"], spec["mix"], spec["mutation"])
        return memo[ref]

    delta = individual({str(e.id): weight[e.id] for e in group.non_base}, tree["mix"], [seed, scale])
    return (base + delta).to(base.dtype)


def tensor_generator(seed: int, tensor_name: str | None) -> torch.Generator:
    """A CPU generator for one tensor: the same (seed, tensor) draws the same numbers in any process."""
    digest = hashlib.sha256(f"{seed}:{tensor_name or ''}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
