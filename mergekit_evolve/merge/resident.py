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
from mergekit_evolve.methods.lora_particle import AdapterError, add_delta, lora_delta, read_adapter

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
    """The folder on disk (the Hub cache for hub ids) of the model, or of the base of an adapter
    reference (``base+adapter``: the adapter is applied in memory, see ``apply_adapter``)."""
    raw = model.model.path
    if os.path.isabs(raw) or raw.startswith(".") or raw.count("/") > 1:
        if not os.path.isdir(raw):
            raise ModelNotFoundError(f"model '{model}' not found: there is no folder {raw}")
    try:
        path = ModelReference(model=model.model).local_path(cache_dir=options.transformers_cache)
    except Exception as e:  # hub lookups raise many types; all mean "not available"
        raise ModelNotFoundError(
            f"model '{model}' not found: it is no local folder and the Hugging Face Hub/cache did not provide it ({e})"
        ) from None
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"model '{model}': no folder at {path}")
    return path


def apply_adapter(model: ModelReference, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's tensors with a PEFT LoRA adapter merged in, computed in memory.

    Each adapted weight becomes ``W + (B @ A) * scaling`` exactly as PEFT's ``merge_and_unload``
    computes it (over a half-precision base: in fp32, then rounded once), so the result equals the
    folder mergekit's ``ModelReference.merged()`` would write to disk; every other tensor is the
    base's own object, shared, not copied.
    """
    assert model.lora is not None
    try:
        adapter = read_adapter(model.lora.path)
    except AdapterError as e:
        raise ModelNotFoundError(f"model '{model}': {e}") from None
    merged = dict(tensors)
    for module, (a, b) in adapter.factors.items():
        name = f"{module}.weight"
        if name not in merged:
            raise ModelNotFoundError(f"adapter {adapter.folder} adapts '{module}', "
                                     f"which model '{model.model}' does not have")
        base = merged[name]
        # PEFT keeps an adapter over a half-precision base in fp32 and adds its delta in place
        compute = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        delta = lora_delta(a.to(base.device), b.to(base.device), adapter.scaling,
                           bool(adapter.config.get("fan_in_fan_out")), compute)
        merged[name] = add_delta(base, delta)
    LOG.info("merged adapter %s into %s in memory (%d weights)", adapter.folder, model.model, len(adapter.factors))
    return merged


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
    """Install resident loaders for ``models`` into mergekit's loader cache (once per process).

    An adapter reference ``base+adapter`` is the base's resident tensors with the adapter merged
    in memory (mergekit's loader would write a merged copy to disk first); several adapters over
    one base share every tensor they leave alone.
    """
    loaders = loader_cache(options)
    for model in models:
        if isinstance(loaders.get(model), ResidentTensors):
            continue
        if model.lora is None:
            loaders[model] = load_resident(model, options, device=device, allow_pickle=allow_pickle)
            continue
        base = ModelReference(model=model.model, override_architecture=model.override_architecture)
        if not isinstance(loaders.get(base), ResidentTensors):
            loaders[base] = load_resident(base, options, device=device, allow_pickle=allow_pickle)
        resident = loaders[base]
        loaders[model] = ResidentTensors(resident.index, apply_adapter(model, resident.tensors))
