"""Source models held in memory: each loaded once per process, then served to mergekit's planner."""

from __future__ import annotations

import logging
import os

import safetensors.torch
import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.options import MergeOptions

from mergekit_evolve.compat.mergekit import loader_cache

LOG = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    pass


class WeightsError(ValueError):
    """A weight file that cannot be read: the message names it and what is wrong."""


class ResidentTensors(LazyTensorLoader):
    """A ``LazyTensorLoader`` whose tensors were all read once and stay resident.

    mergekit's ``LoadTensor`` tasks ask ``LoaderCache`` for a loader per model; installing one
    of these there makes every planned merge read from memory instead of opening shards.
    """

    def __init__(self, index: ShardedTensorIndex, tensors: dict[str, torch.Tensor]):
        super().__init__(index, lazy_unpickle=False)
        self.tensors = tensors

    def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
        if key not in self.tensors:
            for alias in aliases or ():
                if alias in self.tensors:
                    key = alias
                    break
            else:
                if raise_on_missing:
                    raise KeyError(key)
                return None
        return self.tensors[key].to(device)

    def flush(self) -> None:  # nothing to release: residency is the point
        pass

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def local_folder(model: ModelReference, options: MergeOptions) -> str:
    """The model's folder on disk (the Hub cache for hub ids), or a clear error."""
    raw = model.model.path
    if os.path.isabs(raw) or raw.startswith(".") or raw.count("/") > 1:
        if not os.path.isdir(raw):
            raise ModelNotFoundError(f"model '{model}' not found: there is no folder {raw}")
    try:
        path = model.merged(
            cache_dir=options.lora_merge_cache,
            trust_remote_code=options.trust_remote_code,
            lora_merge_dtype=options.lora_merge_dtype,
        ).local_path(cache_dir=options.transformers_cache)
    except Exception as e:  # hub lookups raise many types; all mean "not available"
        raise ModelNotFoundError(
            f"model '{model}' not found: it is no local folder and the Hugging Face Hub/cache did not provide it ({e})"
        ) from None
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"model '{model}': no folder at {path}")
    return path


def load_resident(
    model: ModelReference, options: MergeOptions, device: str = "cpu", allow_pickle: bool = False
) -> ResidentTensors:
    path = local_folder(model, options)
    try:
        index = ShardedTensorIndex.from_disk(path)
    except RuntimeError:
        raise ModelNotFoundError(f"model '{model}': no model.safetensors (or index) in {path}") from None
    if not index.is_safetensors and not allow_pickle:
        raise ModelNotFoundError(
            f"model '{model}' has only pickle checkpoints ({path}); pickles can run code when loaded. "
            "Convert it to safetensors, or pass --allow-pickle if you trust it."
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in index.shards:
        file = os.path.join(index.base_path, shard.filename)
        try:
            if index.is_safetensors:
                tensors.update(safetensors.torch.load_file(file, device=device))
            else:
                tensors.update(torch.load(file, map_location=device, weights_only=True))
        except Exception as e:  # SafetensorError, pickle and OS errors: the file is what is wrong
            raise WeightsError(f"model '{model}': {file} cannot be read ({type(e).__name__}: {e})") from None
    LOG.info("loaded %s (%d tensors) into memory", model, len(tensors))
    return ResidentTensors(index, tensors)


def make_resident(
    models: list[ModelReference], options: MergeOptions, device: str = "cpu", allow_pickle: bool = False
) -> None:
    """Install resident loaders for ``models`` into mergekit's loader cache (once per process)."""
    loaders = loader_cache(options)
    for model in models:
        if not isinstance(loaders.get(model), ResidentTensors):
            loaders[model] = load_resident(model, options, device=device, allow_pickle=allow_pickle)
