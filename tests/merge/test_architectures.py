"""The loop on more than one architecture family: tiny Llama, Qwen2 and Mistral models.

GPT-NeoX is not among them: mergekit 0.1.5's gpt_neox definition requires the
``attention.bias``/``masked_bias`` buffers, which transformers 5 no longer saves, so even
mergekit's own ``run_merge`` refuses such models.
"""

import json
import textwrap

import pytest
import safetensors.torch
import torch
import transformers
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from tiny_models import CONFIGS, make_family, write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.commands.merge import trial_config
from mergekit_evolve.merge.engine import InMemoryMerger

# (family, tied input/output embeddings): small Qwen2 and Llama 3.2 checkpoints tie them
FAMILIES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("mistral", False)]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f"{a}{'-tied' if t else ''}" for a, t in FAMILIES])
def family(request, tmp_path_factory):
    arch, tied = request.param
    config = CONFIGS[arch]()
    config.tie_word_embeddings = tied
    root = tmp_path_factory.mktemp(f"{arch}{'-tied' if tied else ''}")
    return arch, tied, make_family(root, arch, config=config)


def loaded_weights(folder):
    """What a user gets from the folder: tied weights are tied again on load."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.state_dict()


def test_in_memory_equals_run_merge(family, tmp_path):
    arch, tied, (base, v1, v2) = family
    config = MergeConfiguration.model_validate({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(v1), "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                   {"model": str(v2), "parameters": {"weight": 0.6,
                                                     "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}}],
    })
    options = MergeOptions(quiet=True, random_seed=0)
    run_merge(config, str(tmp_path / "out"), options=options)
    assert ("lm_head.weight" in safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")) is not tied

    model = InMemoryMerger(options).materialize(config)
    assert model.config.model_type == arch
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    on_disk, resident = loaded_weights(tmp_path / "out"), model.state_dict()
    assert set(on_disk) == set(resident)
    for key, tensor in on_disk.items():
        assert torch.equal(resident[key], tensor), key


@pytest.mark.slow
def test_short_search(family, tmp_path):
    arch, tied, (base, v1, v2) = family
    write_copy_task(tmp_path)
    recipe = tmp_path / f"{arch}.yml"
    recipe.write_text(textwrap.dedent(f"""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - {{model: {v1}, parameters: {{weight: {{search: [0.0, 1.0], points: 2}}}}}}
          - {{model: {v2}, parameters: {{weight: {{search: [0.0, 1.0]}}}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: random
          trials: 3
          seed: 1
          pruning: {{pruner: none}}    # every candidate scored in full: their values are compared below
          objectives:
            - {{task: tiny_copy, metric: "perplexity,none", goal: minimize, limit: 8, heldout_limit: 8}}
          task_paths: [tasks]
        """))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [str(recipe), "-o", str(run), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in records] == ["COMPLETE"] * 3
    # each candidate is evaluated on its own weights: the resident model really changes between trials
    assert len({r["value"] for r in records}) == 3

    report = json.loads((run / "report.json").read_text())
    winner = trial_config(run, report["winner"]["trial"])
    resident = InMemoryMerger(MergeOptions(random_seed=1, quiet=True)).materialize(winner).state_dict()
    best = loaded_weights(run / "best")
    assert transformers.AutoConfig.from_pretrained(run / "best").model_type == arch
    for key, tensor in best.items():
        assert torch.equal(resident[key], tensor), key
