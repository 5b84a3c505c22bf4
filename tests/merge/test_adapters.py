"""PEFT adapters as merge sources (``base+adapter``): merged in memory, equal to mergekit's disk path."""

import json

import pytest
import safetensors.torch
import torch
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from tiny_models import make_lora_adapter

from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.merge.resident import ModelNotFoundError, make_resident


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama[0]
    return base, [
        make_lora_adapter(base, root / "a1", seed=1),
        make_lora_adapter(base, root / "a2", seed=2, r=4, use_rslora=True),
    ]


def _config(base, adapters, dtype):
    return MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": dtype,
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}}
                   for a, w in zip(adapters, (0.7, 0.4), strict=False)],
    })


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_sources_equal_mergekit_merged_copies(adapters, tmp_path, dtype):
    base, folders = adapters
    config = _config(base, folders, dtype)
    # mergekit's own path: each base+adapter merged by PEFT into a folder, then run_merge to disk
    options = MergeOptions(random_seed=1, quiet=True, lora_merge_cache=str(tmp_path / "lora"), lora_merge_dtype=dtype)
    run_merge(config, str(tmp_path / "out"), options=options)
    on_disk = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")

    LoaderCache().loaders.clear()  # the mergekit run above left disk loaders for the same references
    memory_options = MergeOptions(random_seed=1, quiet=True, lora_merge_cache=str(tmp_path / "unused"))
    model = InMemoryMerger(memory_options).materialize(config)
    state = model.state_dict()
    assert set(on_disk) == set(state)
    changed = 0
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
        changed += not torch.equal(tensor,
                                   safetensors.torch.load_file(base / "model.safetensors")[name].to(tensor.dtype))
    assert changed  # the adapters did change the merge
    assert not (tmp_path / "unused").exists()  # nothing was written to disk


def test_adapters_share_the_base_tensors(adapters):
    base, folders = adapters
    options = MergeOptions(quiet=True)
    LoaderCache().loaders.clear()
    config = _config(base, folders, "float32")
    make_resident(config.referenced_models(), options)
    loaders = LoaderCache().loaders
    by_name = {str(m): loader for m, loader in loaders.items()}
    plain, adapted = by_name[str(base)].tensors, by_name[f"{base}+{folders[0]}"].tensors
    assert plain["model.embed_tokens.weight"] is adapted["model.embed_tokens.weight"]
    assert not torch.equal(plain["model.layers.0.self_attn.q_proj.weight"],
                           adapted["model.layers.0.self_attn.q_proj.weight"])


def test_unsupported_adapter_is_refused(adapters, tmp_path):
    base, folders = adapters
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in folders[0].iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    LoaderCache().loaders.clear()
    with pytest.raises(ModelNotFoundError, match="only plain LoRA"):
        make_resident(_config(base, [dora], "float32").referenced_models(), MergeOptions(quiet=True))
