"""``gaussian_mutation``: task arithmetic plus Gaussian noise on each matrix of the merged task vector.

CycleQD's simple mutation variant: ``tau' = tau + noise * std(tau) * N(0, 1)`` for every weight
matrix, drawn from a stream seeded by (``seed``, tensor name); ``noise: 0`` applies none.
``lineage`` adds the mutated ancestors a CycleQD child inherits (see ``mutated_task_arithmetic``).
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


@merge_method(
    name="gaussian_mutation",
    pretty_name="Task arithmetic + Gaussian mutation",
    reference_url="https://arxiv.org/abs/2410.14735",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def gaussian_mutation(
    group: TensorGroup, weight: PerNonBase[float], seed: int = 0, noise: float = 0.0, lineage: str = "",
) -> torch.Tensor:
    def mutate(delta: torch.Tensor, seed: int, noise: float) -> torch.Tensor:
        draw = torch.randn(delta.shape, generator=tensor_generator(seed, group.metadata.name), dtype=torch.float32)
        return delta + (noise * delta.float().std() * draw.to(delta.device)).to(delta.dtype)

    return mutated_task_arithmetic(group, weight, mutate, seed, noise, lineage)
