"""Output configs of passthrough merges for model types whose config lists ``layer_types``.

Qwen 2/3 and Gemma 2/3 (transformers 5) describe each decoder layer in ``config.layer_types``
(full or sliding-window attention). mergekit sets ``num_hidden_layers`` to the slices' total but
keeps the base model's list, so a merge with more layers than the base fails in the attention
constructor (IndexError) and one with fewer cannot be saved. The list is rebuilt here: layer k of
the output takes the type of the source layer its slice copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import transformers
from mergekit.config import MergeConfiguration

from mergekit_evolve.compat.mergekit import out_config as mergekit_out_config
from mergekit_evolve.compat.mergekit import run_merge_out_config


def sliced_layer_types(config: MergeConfiguration, trust_remote_code: bool = False) -> list[str] | None:
    """Each output layer's type, from the source layer its slice copies; None when not applicable."""
    if not config.slices or config.modules:
        return None
    types: list[str] = []
    for piece in config.slices:
        source = piece.sources[0]
        listed = getattr(source.model.config(trust_remote_code=trust_remote_code), "layer_types", None)
        if not listed:
            return None
        start, end = source.layer_range
        types.extend(listed[start:end])
    return types


def fix_layer_types(cfg_out: transformers.PretrainedConfig, config: MergeConfiguration,
                    trust_remote_code: bool = False) -> None:
    """Give ``cfg_out`` (mergekit's output config of ``config``) one layer type per output layer."""
    if getattr(cfg_out, "layer_types", None) is None:
        return
    types = sliced_layer_types(config, trust_remote_code)
    if types is not None:
        cfg_out.layer_types = types
        cfg_out.num_hidden_layers = len(types)


def out_config(config: MergeConfiguration, arch_info: Any,
               trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """mergekit's output config of ``config``, with ``layer_types`` rebuilt for sliced merges."""
    cfg_out = mergekit_out_config(config, arch_info, trust_remote_code=trust_remote_code)
    fix_layer_types(cfg_out, config, trust_remote_code)
    return cfg_out


@contextlib.contextmanager
def layer_types_fixed() -> Iterator[None]:
    """Inside: ``mergekit.merge.run_merge`` writes configs whose ``layer_types`` fit the slices."""
    with run_merge_out_config(out_config):
        yield
