"""The memory plan: sources, working model and activations from file headers; a run that cannot fit is refused."""

import pytest
import safetensors.torch
from mergekit.common import ModelReference
from tiny_models import make_lora_adapter

from mergekit_evolve.merge.memory_plan import GIB, MemoryPlan, MemoryPlanError, memory_plan


def test_plan_counts_a_shared_base_once_and_adapters_by_what_they_change(tiny_llama, tmp_path):
    base = tiny_llama[0]
    adapter = make_lora_adapter(base, tmp_path / "a")
    tensors = safetensors.torch.load_file(base / "model.safetensors")
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    changed = sum(t.numel() * t.element_size() for k, t in tensors.items() if "q_proj" in k or "down_proj" in k)
    sources = [ModelReference.model_validate(str(base)), ModelReference.model_validate(f"{base}+{adapter}")]
    plan = memory_plan(sources, {str(m): str(base) for m in sources}, "bfloat16", "cpu", 8)
    assert list(plan.sources.values()) == [full, changed]
    assert plan.mapped[str(base)] and not plan.mapped[f"{base}+{adapter}"]
    assert plan.working == 2 * full // 2  # model + merge buffers, at bf16
    assert plan.activations > 0
    assert any("memory-mapped" in line for line in plan.lines())


def test_a_run_that_cannot_fit_is_refused_with_the_numbers():
    plan = MemoryPlan(device="cpu", sources={"a": 3 * GIB}, mapped={"a": True}, working=2 * GIB, activations=GIB,
                      available=4 * GIB)
    with pytest.raises(MemoryPlanError, match=r"6.00 GiB on cpu but 4.00 GiB"):
        plan.check()
    MemoryPlan(device="cpu", sources={"a": GIB}, mapped={"a": True}, available=4 * GIB).check()
