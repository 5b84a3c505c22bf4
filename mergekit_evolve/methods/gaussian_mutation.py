"""``gaussian_mutation``: task arithmetic plus Gaussian noise on each matrix of the merged task vector.

CycleQD's simple mutation variant: ``tau' = tau + noise * std(tau) * N(0, 1)`` for every weight
matrix, drawn from a stream seeded by (``seed``, tensor name); ``noise: 0`` applies none.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup, merge_method

from mergekit_evolve.methods.common import task_vector_sum, tensor_generator


@merge_method(
    name="gaussian_mutation",
    pretty_name="Task arithmetic + Gaussian mutation",
    reference_url="https://arxiv.org/abs/2410.14735",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def gaussian_mutation(group: TensorGroup, weight: PerNonBase[float], seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    base = group.base.tensor
    if not group.non_base:
        return base
    delta = task_vector_sum(group, weight)
    if noise > 0 and delta.dim() == 2:
        draw = torch.randn(delta.shape, generator=tensor_generator(seed, group.metadata.name), dtype=torch.float32)
        delta = delta + (noise * delta.float().std() * draw.to(delta.device)).to(delta.dtype)
    return (base + delta).to(base.dtype)
