"""The in-memory engine writes exactly the tensors mergekit's own run_merge writes to disk."""

import pytest
import safetensors.torch
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_evolve.merge.engine import InMemoryMerger


def configs(base, v1, v2):
    grad = [0.1, 0.9, 0.4]
    filt = [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": str(v1), "parameters": {"weight": grad}},
            {"model": str(v2), "parameters": {"weight": filt}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "models": [
            {"model": str(v1), "parameters": {"weight": grad}},
            {"model": str(v2), "parameters": {"weight": filt}}]},
        "task_arithmetic_bf16": {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
            "parameters": {"lambda": 0.9}, "models": [
            {"model": str(v1), "parameters": {"weight": grad}}, {"model": str(v2), "parameters": {"weight": 0.3}}]},
        "linear_bf16": {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False}, "models": [
            {"model": str(v1), "parameters": {"weight": 0.3}}, {"model": str(v2), "parameters": {"weight": filt}}]},
        "ties": {"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": False}, "models": [
            {"model": str(v1), "parameters": {"weight": 0.7, "density": filt}},
            {"model": str(v2), "parameters": {"weight": grad, "density": 0.5}}]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(base), "models": [
            {"model": str(v1), "parameters": {"weight": 0.7, "density": grad}},
            {"model": str(v2), "parameters": {"weight": 0.5, "density": filt}}]},
        "slerp": {"merge_method": "slerp", "base_model": str(v1), "parameters": {"t": [
            {"filter": "mlp", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
            "slices": [{"sources": [{"model": str(v1), "layer_range": [0, 4]},
                                    {"model": str(v2), "layer_range": [0, 4]}]}]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(v1), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(v2), "layer_range": [1, 4], "parameters": {"scale": [
                {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]}]},
    }


def with_other_values(node):
    """The same config with every parameter value changed (layer ranges kept)."""
    if isinstance(node, dict):
        return {k: v if k == "layer_range" else with_other_values(v) for k, v in node.items()}
    if isinstance(node, list):
        return [with_other_values(v) for v in node]
    if isinstance(node, float):
        return round(1 - node, 3) if 0 < node < 1 else node / 2
    return node


@pytest.mark.parametrize("chunk_bytes", [0, 512])  # 512 bytes: every tensor runs in many row blocks
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "linear_bf16", "task_arithmetic_bf16", "ties",
                                    "dare_ties", "slerp", "passthrough"])
def test_in_memory_equals_run_merge(tiny_llama, tmp_path, method, chunk_bytes):
    config = MergeConfiguration.model_validate(configs(*tiny_llama)[method])
    options = MergeOptions(random_seed=1234, quiet=True)
    run_merge(config, str(tmp_path / "out"), options=options)
    on_disk = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")

    merger = InMemoryMerger(options, chunk_bytes=chunk_bytes)
    # a trial of the same recipe first: the planner reuses its tasks and must re-resolve every parameter
    twin = MergeConfiguration.model_validate(with_other_values(configs(*tiny_llama)[method]))
    assert twin != config
    merger.materialize(twin)
    model = merger.materialize(config)
    state = model.state_dict()
    assert set(on_disk) == set(state)
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name

    # the resident model is reused, not rebuilt, and a repeat gives the same weights
    again = merger.materialize(config)
    assert again is model
    for name, tensor in on_disk.items():
        assert torch.equal(again.state_dict()[name], tensor), name
