"""``svd_mutation``: task arithmetic whose merged task vector gets CycleQD's SVD mutation.

For every weight matrix of the child's task vector ``tau = sum_j weight_j tau_j``:
``tau' = U diag(S * w) V^T`` with ``U S V^T = tau`` and ``w ~ U[0, w_max]^r`` drawn from a stream
seeded by (``seed``, tensor name); vectors (norms, biases) are left as they are. ``w_max: 0``
applies no mutation, so the config then merges exactly what ``task_arithmetic`` would.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
    merge_method,
)

from mergekit_evolve.methods.common import mutated_task_arithmetic, tensor_generator


def svd_mutate(delta: torch.Tensor, seed: int, w_max: float, tensor_name: str | None) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    w = torch.rand(s.shape[0], generator=tensor_generator(seed, tensor_name), dtype=torch.float32) * w_max
    return ((u * (s * w.to(s.device))) @ vh).to(delta.dtype)


@merge_method(
    name="svd_mutation",
    pretty_name="Task arithmetic + SVD mutation (CycleQD)",
    reference_url="https://arxiv.org/abs/2410.14735",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def svd_mutation(group: TensorGroup, weight: PerNonBase[float], seed: int = 0, w_max: float = 0.0) -> torch.Tensor:
    mutate = (lambda delta: svd_mutate(delta, seed, w_max, group.metadata.name)) if w_max > 0 else None
    return mutated_task_arithmetic(group, weight, mutate)
