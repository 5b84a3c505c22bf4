"""What a run will hold in memory, computed from file headers before any weight is loaded.

A worker keeps every source resident (safetensors sources are memory-mapped: their pages are
file-backed, shared and reclaimable, but they count in the RSS once read), an adapter source
only the weights its adapter changes, one working model of the output shape plus the buffers
the fused merge kernels write into, and the activations of one scoring batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
import transformers
from mergekit.common import ModelReference, dtype_from_name

ASSUMED_TOKENS = 256  # sequence length the activation estimate assumes (requests are built later)
GIB = 1024**3


class MemoryPlanError(RuntimeError):
    pass


@dataclass
class MemoryPlan:
    device: str
    sources: dict[str, int] = field(default_factory=dict)  # bytes each source adds
    mapped: dict[str, bool] = field(default_factory=dict)  # memory-mapped rather than copied
    working: int = 0  # the resident merged model and the merge kernels' output buffers
    activations: int = 0  # one scoring batch
    available: int | None = None  # free memory on the device now (None: unknown)

    @property
    def total(self) -> int:
        return sum(self.sources.values()) + self.working + self.activations

    def lines(self) -> list[str]:
        out = [f"memory plan on {self.device}:"]
        for name, size in self.sources.items():
            how = "memory-mapped" if self.mapped[name] else "copied into memory"
            out.append(f"  source {name}: {size / GIB:.2f} GiB ({how})")
        out.append(f"  working model + merge buffers: {self.working / GIB:.2f} GiB")
        out.append(f"  activations (one batch of {ASSUMED_TOKENS}-token requests): {self.activations / GIB:.2f} GiB")
        free = "unknown" if self.available is None else f"{self.available / GIB:.2f} GiB"
        out.append(f"  total {self.total / GIB:.2f} GiB; available now {free}")
        return out

    def check(self) -> None:
        """Refuse a run that cannot fit, with the numbers, before anything is loaded."""
        if self.available is not None and self.total > self.available:
            raise MemoryPlanError(
                f"the run needs about {self.total / GIB:.2f} GiB on {self.device} but {self.available / GIB:.2f} GiB "
                "is available (" + "; ".join(line.strip() for line in self.lines()[1:-1]) + "); "
                "use fewer sources, a smaller batch_size or dtype, or another device"
            )


_ITEMSIZE = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}


def _tensor_sizes(folder: Path) -> tuple[dict[str, tuple[int, int]], bool]:
    """(elements, bytes per element) per tensor from the safetensors headers, and whether the
    folder's tensors are memory-mapped (safetensors) or copied (pickles: sized by their files)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return {str(p): (p.stat().st_size // 4, 4) for p in folder.glob("*.bin")}, False
    sizes: dict[str, tuple[int, int]] = {}
    for file in files:
        with safetensors.safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                sizes[key] = (math.prod(part.get_shape()), _ITEMSIZE.get(part.get_dtype(), 1))
    return sizes, True


def _adapted_keys(adapter: Path) -> list[str]:
    with safetensors.safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    return [k.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight" for k in keys if ".lora_A." in k]


def available_bytes(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no figure, no refusal
        return None


def memory_plan(sources: list[ModelReference], folders: dict[str, str], out_dtype: str | None, device: str,
                batch_size: int | str) -> MemoryPlan:
    """The plan for ``sources`` (``folders``: each source's local folder, the base's for an adapter)."""
    plan = MemoryPlan(device=device, available=available_bytes(device))
    seen: dict[str, tuple[dict[str, tuple[int, int]], bool]] = {}
    for model in sources:
        folder = folders[str(model)]
        if folder not in seen:
            seen[folder] = _tensor_sizes(Path(folder))
        sizes, mapped = seen[folder]
        if model.lora is None:
            plan.sources[str(model)], plan.mapped[str(model)] = sum(n * b for n, b in sizes.values()), mapped
            continue
        base = str(ModelReference(model=model.model))
        if base not in plan.sources:  # the base itself, held once for all its adapters
            plan.sources[base], plan.mapped[base] = sum(n * b for n, b in sizes.values()), mapped
        adapted = [sizes[k] for k in _adapted_keys(Path(model.lora.path)) if k in sizes]
        plan.sources[str(model)], plan.mapped[str(model)] = sum(n * b for n, b in adapted), False
    sizes, _ = seen[folders[str(sources[0])]]
    itemsize = (torch.finfo(dtype_from_name(out_dtype)).bits // 8 if out_dtype
                else max((b for _, b in sizes.values()), default=4))
    plan.working = 2 * sum(n for n, _ in sizes.values()) * itemsize
    config = transformers.AutoConfig.from_pretrained(folders[str(sources[0])])
    batch = batch_size if isinstance(batch_size, int) else 1
    vocab, hidden = getattr(config, "vocab_size", 0), getattr(config, "hidden_size", 0)
    # logits and their log-softmax in fp32, plus the residual stream a layer at a time
    plan.activations = batch * ASSUMED_TOKENS * (2 * vocab + 8 * hidden) * 4
    return plan
