"""PEFT LoRA adapters read once per process, and ``lora_particle``: a Model Swarms particle as an adapter.

Model Swarms' released code (BunsenFeng/model_swarm, ``merge.py: lora_merge``) combines experts
that are LoRA adapters over one base by a weighted sum of every tensor of their state dicts, so
``lora_A`` and ``lora_B`` are combined separately; every swarm step (crossover, velocity, position)
is such a sum, so a particle with coefficients ``c`` over the experts is the adapter
``A = sum_i c_i A_i``, ``B = sum_i c_i B_i`` and its model is ``W + scaling * B @ A``.
Task arithmetic over the adapted models instead gives ``W + scaling * sum_i c_i B_i A_i``.

``lora_particle`` merges the first: each expert is a ``base+adapter`` model with weight ``c_i``;
a weight no adapter touches is the base's. The delta is computed as PEFT's ``merge_and_unload``
computes it for the combined adapter (factors in fp32, ``transpose(B @ A) * scaling``, added to
the base in fp32 and rounded once), so the merge equals PEFT's merge of the adapter that
``particle_adapter`` returns.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from mergekit.common import ModelReference
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup, merge_method

METHOD = "lora_particle"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: base_model.model.<module>.lora_A.weight
# adapter_config keys that change what an adapter's factors mean: not merged here
UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias")
# what two adapters must share for their factors to be added (besides the modules and shapes)
SHARED = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules", "layers_to_transform")


class AdapterError(ValueError):
    """An adapter this package cannot merge; the message names its folder."""


def adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, checked to be a plain LoRA one."""
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"the adapter {folder} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a local PEFT folder)")
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    unsupported = [k for k in UNSUPPORTED if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise AdapterError(
            f"adapter {folder}: only plain LoRA adapters merge in memory "
            f"(it has {config.get('peft_type')} {unsupported})"
        )
    return config


def _modules(folder: Path, keys: Sequence[str]) -> list[str]:
    """The modules an adapter adapts, from its tensor names (every tensor must be a LoRA factor)."""
    for key in keys:
        if ".lora_A." not in key and ".lora_B." not in key:
            raise AdapterError(f"adapter {folder}: tensor '{key}' is no LoRA factor "
                               "(embedding adapters are not supported)")
    return sorted(key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX) for key in keys if ".lora_A." in key)


@dataclass(frozen=True)
class LoraAdapter:
    folder: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B) as stored

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / (r**0.5) if self.config.get("use_rslora") else alpha / r


@functools.lru_cache(maxsize=64)
def _read(folder: str, _mtime_ns: int) -> LoraAdapter:
    path = Path(folder)
    config = adapter_config(path)
    weights = safetensors.torch.load_file(path / ADAPTER_WEIGHTS)
    _modules(path, list(weights))
    factors = {
        key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX): (weights[key], weights[key.replace(".lora_A.", ".lora_B.")])
        for key in sorted(weights) if ".lora_A." in key
    }
    return LoraAdapter(path, config, factors)


def read_adapter(folder: str | Path) -> LoraAdapter:
    """The adapter in ``folder``, read once per process (again if its weights file changed)."""
    path = Path(folder)
    weights = path / ADAPTER_WEIGHTS
    return _read(str(path), weights.stat().st_mtime_ns if weights.is_file() else 0)


def adapter_signature(folder: Path) -> dict[str, Any]:
    """What must match between adapters whose factors are added, from the config and the weight
    file's header only (no tensor is read)."""
    config = adapter_config(folder)
    with safetensors.safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
        shapes = {k.removeprefix(PEFT_PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    _modules(folder, list(shapes))
    target = config.get("target_modules")
    return {
        **{k: sorted(target) if k == "target_modules" and isinstance(target, list) else config.get(k) for k in SHARED},
        "factors": shapes,
    }


def check_same_shape(folders: Sequence[Path]) -> None:
    """AdapterError, naming the first adapter that differs from the first one, unless all share
    rank, alpha, target modules and factor shapes."""
    first = adapter_signature(folders[0])
    for folder in folders[1:]:
        other = adapter_signature(folder)
        diff = [k for k in first if first[k] != other[k]]
        if diff:
            what = "; ".join(
                f"{k}: {other[k]} vs {first[k]}" if k != "factors" else "other adapted modules or factor shapes"
                for k in diff
            )
            raise AdapterError(
                f"adapter {folder} cannot be combined factor by factor with {folders[0]} ({what}): "
                "LoRA particles need adapters of the same rank, alpha and target modules"
            )


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: ``transpose(B @ A) * scaling``, in ``dtype``."""
    delta = b.to(dtype) @ a.to(dtype)
    return (delta.T if fan_in_fan_out else delta) * scaling


def add_delta(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's in-place ``weight += delta`` (over a half-precision base: in fp32, rounded once)."""
    compute = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    return (base.to(compute) + delta.to(base.device, compute)).to(base.dtype)


def combined_factors(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], module: str, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sum_i w_i A_i, sum_i w_i B_i)`` in fp32 for one module (None: no adapter adapts it)."""
    held = [(w, adapter.factors[module]) for adapter, w in zip(adapters, weights, strict=False)
            if module in adapter.factors]
    if not held:
        return None
    if len(held) < len(adapters):
        missing = [str(a.folder) for a in adapters if module not in a.factors]
        raise AdapterError(f"adapter {missing[0]} does not adapt '{module}', which the other experts' adapters do")
    a_sum = sum(w * a.to(device, torch.float32) for w, (a, _) in held)
    b_sum = sum(w * b.to(device, torch.float32) for w, (_, b) in held)
    return a_sum, b_sum  # type: ignore[return-value]


def expert_adapter(model: ModelReference) -> LoraAdapter:
    if model.lora is None:
        raise AdapterError(f"lora_particle merges LoRA adapters over the base, but model '{model}' has none "
                           "(write it as base+adapter)")
    return read_adapter(model.lora.path)


def particle_adapter(models: Sequence[ModelReference],
                     weights: Sequence[float]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The particle as a PEFT adapter: the first expert's config and the combined factors (fp32),
    under PEFT's key names; loaded over the base and merged by PEFT it is the ``lora_particle`` merge."""
    adapters = [expert_adapter(m) for m in models]
    tensors: dict[str, torch.Tensor] = {}
    for module in adapters[0].factors:
        combined = combined_factors(adapters, weights, module)
        assert combined is not None
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = combined[0].contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = combined[1].contiguous()
    return dict(adapters[0].config), tensors


def write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    safetensors.torch.save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


@merge_method(
    name=METHOD,
    pretty_name="LoRA factors combined separately (Model Swarms)",
    reference_url="https://arxiv.org/abs/2410.11163",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lora_particle(group: TensorGroup, weight: PerNonBase[float]) -> torch.Tensor:
    base = group.base.tensor
    name = group.metadata.name or ""
    if not group.non_base or not name.endswith(".weight"):
        return base
    adapters = [expert_adapter(e.id) for e in group.non_base]
    combined = combined_factors(adapters, [weight[e.id] for e in group.non_base], name.removesuffix(".weight"),
                                base.device)
    if combined is None:  # no adapter touches it: every expert holds the base's tensor
        return base
    config = adapters[0].config
    delta = lora_delta(*combined, adapters[0].scaling, bool(config.get("fan_in_fan_out")), torch.float32)
    return add_delta(base, delta)
