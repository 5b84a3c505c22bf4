"""Model Swarms over LoRA particles (``particle_kind: lora``): A and B combined separately, the
merge equal to PEFT's own merge of the particle written as an adapter, mismatched adapters refused."""

import json

import pytest
import safetensors.torch
import torch
import transformers
from click.testing import CliRunner
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from sampler_harness import write_recipe
from tiny_models import make_family, make_lora_adapter, write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.methods.lora_particle import read_adapter
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.report.winner import write_best
from mergekit_evolve.samplers.registry import SamplerSetupError, prepare_recipe

LORA = "{particles: 4, particle_kind: lora}"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_swarm")
    write_copy_task(root)
    base = make_family(root / "fam", "llama", variants=1, seed=1)[0]
    adapters = [make_lora_adapter(base, root / "a1", seed=1), make_lora_adapter(base, root / "a2", seed=2)]
    return root, base, adapters


def _recipe(ws, name, adapters=None, options=LORA, dtype="float32", **kwargs):
    root, base, folders = ws
    path = write_recipe(root, [base, *(f"{base}+{a}" for a in adapters or folders)], sampler="swarm", name=name,
                        options=options, two_objectives=False, params="parameters: {normalize: false}\n", **kwargs)
    path.write_text(path.read_text().replace("dtype: float32", f"dtype: {dtype}"))
    return path


def _peft_merge(base, adapter, dtype):
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_particle_merge_is_pefts_merge_of_the_written_adapter(ws, tmp_path, dtype):
    root, base, folders = ws
    path = _recipe(ws, f"lora_{dtype}", dtype=dtype)
    recipe = prepare_recipe(load_recipe(path))
    assert prepare_recipe(recipe).template == recipe.template  # idempotent
    point = {"a1.weight": 0.7, "a2.weight": -0.4}  # an extrapolation, as swarm moves make
    config = recipe.compile(point)
    assert config.merge_method == "lora_particle"
    LoaderCache().loaders.clear()
    options = MergeOptions(random_seed=1, quiet=True)
    memory = {k: v.clone() for k, v in InMemoryMerger(options).materialize(config).state_dict().items()}

    best = write_best(tmp_path, path, config, options, out=tmp_path / "best")
    written = safetensors.torch.load_file(best / "model.safetensors")
    peft_merged = _peft_merge(base, best / "adapter", getattr(torch, dtype))
    assert set(written) <= set(peft_merged)
    for name, tensor in written.items():
        # bit for bit in both dtypes: the particle is stored in fp32 and both sides add its fp32 delta
        # to the base and round once (PEFT keeps fp32 factors over a bf16 base)
        assert torch.equal(peft_merged[name], tensor), name
        assert torch.equal(memory[name], tensor), name

    # the paper's particle, not task arithmetic over the adapted models
    a1, a2 = read_adapter(folders[0]), read_adapter(folders[1])
    module = Q.removesuffix(".weight")
    (qa1, qb1), (qa2, qb2) = a1.factors[module], a2.factors[module]
    w = safetensors.torch.load_file(base / "model.safetensors")[Q]
    particle = w + a1.scaling * (0.7 * qb1 - 0.4 * qb2) @ (0.7 * qa1 - 0.4 * qa2)
    task_arithmetic = w + a1.scaling * (0.7 * qb1 @ qa1 - 0.4 * qb2 @ qa2)
    tol = {"atol": 1e-5} if dtype == "float32" else {"atol": 2e-2}
    assert torch.allclose(memory[Q].float(), particle, **tol)
    assert not torch.allclose(memory[Q].float(), task_arithmetic, **tol)
    stored = json.loads((best / "adapter" / "adapter_config.json").read_text())
    assert stored == {**a1.config, "base_model_name_or_path": str(base)}  # the recipe's base, not the trainer's


def test_a_one_hot_particle_is_the_expert(ws):
    root, base, folders = ws
    recipe = prepare_recipe(load_recipe(_recipe(ws, "one_hot")))
    LoaderCache().loaders.clear()
    merger = InMemoryMerger(MergeOptions(quiet=True))
    particle = merger.materialize(recipe.compile({"a1.weight": 1.0, "a2.weight": 0.0})).state_dict()
    adapted = _peft_merge(base, folders[0], torch.float32)
    assert all(torch.equal(particle[k], adapted[k]) for k in particle)


@pytest.mark.parametrize("change, message", [
    ({"r": 4}, r"a_r4 cannot be combined .*r: 4 vs 2"),
    ({"target_modules": ["q_proj"]}, r"a_q cannot be combined .*target_modules"),
])
def test_mismatched_adapters_are_refused_before_weights_load(ws, change, message):
    root, base, folders = ws
    name = "a_r4" if "r" in change else "a_q"
    other = make_lora_adapter(base, root / name, seed=3, **change)
    path = _recipe(ws, f"bad_{name}", adapters=[folders[0], other])
    with pytest.raises(SamplerSetupError, match=message):
        prepare_recipe(load_recipe(path))
    result = CliRunner().invoke(cli, [str(path), "-o", str(root / "runs" / name), "--no-progress"])
    assert result.exit_code == 1 and str(other) in result.output and not (root / "runs" / name).exists()


def test_an_expert_that_is_no_adapter_is_refused(ws):
    root, base, folders = ws
    path = write_recipe(root, [base, f"{base}+{folders[0]}", base.parent / "v1"], sampler="swarm", name="mixed",
                        options=LORA, two_objectives=False, params="parameters: {normalize: false}\n")
    with pytest.raises(SamplerSetupError, match=r"LoRA adapter over the base .*v1' is not"):
        prepare_recipe(load_recipe(path))


def test_task_vector_particles_stay_the_default(ws):
    recipe = prepare_recipe(load_recipe(_recipe(ws, "tv", options="{particles: 4}")))
    assert recipe.template["merge_method"] == "task_arithmetic"


@pytest.mark.slow
def test_a_lora_swarm_run_writes_best_and_its_adapter(ws):
    root, base, _ = ws
    path = _recipe(ws, "lora_run", trials=6)
    run_dir = root / "runs" / "lora_run"
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    configs = [x["config"] for x in lines if x.get("config")]
    assert len(configs) >= 6 and all("merge_method: lora_particle" in c for c in configs)
    best = run_dir / "best"
    assert ((best / "adapter" / "adapter_config.json").exists()
            and (best / "adapter" / "adapter_model.safetensors").exists())
    written = safetensors.torch.load_file(best / "model.safetensors")
    merged = _peft_merge(base, best / "adapter", torch.float32)
    assert all(torch.equal(merged[k], v) for k, v in written.items())
