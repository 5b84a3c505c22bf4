"""``svd_mutation``: task arithmetic whose merged task vector gets CycleQD's SVD mutation.

For every weight matrix of the child's task vector ``tau = sum_j weight_j tau_j``:
``tau' = U diag(S * w) V^T`` with ``U S V^T = tau`` and ``w ~ U[w_min, w_max]^r`` drawn from a
stream seeded by (``seed``, tensor name); vectors (norms, biases) are left as they are.
``w_max: 0`` applies no mutation, so the config then merges exactly what ``task_arithmetic``
would. The paper draws ``w ~ U[0, w_max]``; the released code adds ``U diag(U[0, 0.1]^r S) V^T``,
which on the child's own SVD is ``w ~ U[1, 1.1]`` (``w_min: 1, w_max: 1.1``). ``lineage`` adds the
mutated ancestors a CycleQD child inherits (see ``mutated_task_arithmetic``).
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


def svd_mutate(delta: torch.Tensor, seed: int, w_max: float, tensor_name: str | None,
               w_min: float = 0.0) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    draw = torch.rand(s.shape[0], generator=tensor_generator(seed, tensor_name), dtype=torch.float32)
    w = w_min + draw * (w_max - w_min)
    return ((u * (s * w.to(s.device))) @ vh).to(delta.dtype)


@merge_method(
    name="svd_mutation",
    pretty_name="Task arithmetic + SVD mutation (CycleQD)",
    reference_url="https://arxiv.org/abs/2410.14735",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def svd_mutation(
    group: TensorGroup, weight: PerNonBase[float], seed: int = 0, w_max: float = 0.0, w_min: float = 0.0,
    lineage: str = "",
) -> torch.Tensor:
    def mutate(delta: torch.Tensor, seed: int, w_max: float) -> torch.Tensor:
        return svd_mutate(delta, seed, w_max, group.metadata.name, w_min)

    return mutated_task_arithmetic(group, weight, mutate, seed, w_max, lineage)
