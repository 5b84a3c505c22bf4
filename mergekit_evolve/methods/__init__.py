"""This package's merge methods; importing it registers them with mergekit (see ``registry.py``)."""

from mergekit.merge_methods import register

from mergekit_evolve.methods.gaussian_mutation import gaussian_mutation
from mergekit_evolve.methods.lora_particle import lora_particle
from mergekit_evolve.methods.svd_mutation import svd_mutation

for _method in (svd_mutation, gaussian_mutation, lora_particle):
    register(_method)
