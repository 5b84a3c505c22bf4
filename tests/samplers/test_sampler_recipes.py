"""The samplers on real recipes: what each needs from the recipe (clean errors before any search),
CycleQD's mutated candidates as reproducible mergekit configs, and runs that resume."""

import json
import re

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from sampler_harness import write_recipe
from tiny_models import make_family, write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.samplers.registry import SamplerSetupError, prepare_recipe


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("samplers")
    write_copy_task(root)
    return root


@pytest.fixture(scope="module")
def family(ws):
    return make_family(ws / "fam", "llama", variants=3, seed=1)


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args] + ["--no-progress"], catch_exceptions=False)


@pytest.mark.parametrize("sampler, kwargs, message", [
    ("cycleqd", {"method": "ties"}, "merge_method must be task_arithmetic, not 'ties'"),
    ("swarm", {"method": "linear"}, r"set parameters: \{normalize: false\}"),
    ("cycleqd", {"params": "parameters: {int8_mask: true}\n"}, r"remove the top-level parameters \['int8_mask'\]"),
    ("cycleqd", {"two_objectives": False}, "at least two objectives"),
    ("swarm", {"low": 0.5}, r"searches \[0.5, 1.0\]; widen it to include \[0, 1\]"),
])
def test_recipes_a_sampler_cannot_search_fail_before_the_search(ws, family, sampler, kwargs, message):
    path = write_recipe(ws, family, sampler=sampler, name=f"bad_{sampler}", **kwargs)
    with pytest.raises(SamplerSetupError, match=message):
        prepare_recipe(load_recipe(path))
    run_dir = ws / "runs" / f"bad_{sampler}"
    result = run_cli(path, "-o", run_dir)
    assert result.exit_code == 1 and "Error" in result.output and not run_dir.exists()
    dry = run_cli(path, "--dry-run")
    assert dry.exit_code == 1 and re.search(message, dry.output)


def test_a_swarm_needs_two_experts_on_the_command_line(ws, family):
    path = write_recipe(ws, family[:2], sampler="swarm", name="one_expert")
    result = run_cli(path, "-o", ws / "runs" / "one_expert")
    assert result.exit_code == 1 and "at least two experts" in result.output and "has 1" in result.output


def test_a_swarm_recipe_searches_its_weights_in_the_swarms_box(ws, family):
    path = write_recipe(ws, family, sampler="swarm", name="swarm_box", two_objectives=False,
                        params="parameters: {normalize: false}\n")
    recipe = prepare_recipe(load_recipe(path))
    weights = [d for n, d in recipe.search_space.dimensions.items() if n.endswith("weight")]
    assert len(weights) == 3 and all((d.low, d.high) == (-5.0, 5.0) for d in weights)
    assert prepare_recipe(recipe).search_space.dimensions == recipe.search_space.dimensions  # idempotent
    config = recipe.compile({d.name: -1.5 for d in weights})  # an extrapolation compiles as written
    assert [m.parameters["weight"] for m in config.models[1:]] == [-1.5, -1.5, -1.5]


def test_cycleqd_candidates_are_reproducible_mergekit_configs(ws, family, tmp_path):
    recipe = prepare_recipe(load_recipe(write_recipe(ws, family, sampler="cycleqd", name="cqd_compile")))
    assert prepare_recipe(recipe) is recipe  # idempotent: a resumed stage may prepare twice
    point = {"v1.weight": 0.6, "v2.weight": 0.3, "v3.weight": 0.8, "mutation.seed": 1234, "mutation.w_max": 2.0}
    config = recipe.compile(point)
    assert config.merge_method == "svd_mutation"
    assert config.parameters == {"seed": 1234, "w_max": 2.0}
    options = MergeOptions(random_seed=3, quiet=True)
    run_merge(config.model_copy(deep=True), str(tmp_path / "out"), options=options)
    on_disk = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    merger = InMemoryMerger(options)
    state = {k: v.clone() for k, v in merger.materialize(config).state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in on_disk.items())

    unmutated = recipe.compile({**point, "mutation.w_max": 0.0})
    plain = load_recipe(write_recipe(ws, family, sampler="tpe", name="ta")).compile(
        {"v1.weight": 0.6, "v2.weight": 0.3, "v3.weight": 0.8})
    assert plain.merge_method == "task_arithmetic"
    a = merger.materialize(unmutated).state_dict()
    a = {k: v.clone() for k, v in a.items()}
    b = merger.materialize(plain).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # w_max 0 is plain task arithmetic
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(state[name], a[name])  # the mutation changes matrices ...
    assert torch.equal(state["model.norm.weight"], a["model.norm.weight"])  # ... and leaves vectors alone


@pytest.mark.slow
def test_cycleqd_run_keeps_archives_and_resumes(ws, family):
    path = write_recipe(ws, family, sampler="cycleqd", name="cqd_run", trials=8, options="{children: 2}")
    run_dir = ws / "runs" / "cqd_run"
    assert run_cli(path, "-o", run_dir).exit_code == 0
    first = json.loads((run_dir / "archives.json").read_text())
    assert first["experts"] == [p.name for p in family[1:]] and len(first["archives"]) == 2
    cells = [c for a in first["archives"] for c in a["cells"]]
    assert cells and all(len(c["coefficients"]) == 3 for c in cells)
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert [x["config"].count("svd_mutation") for x in lines[:3]] == [1, 1, 1]
    assert all(x["point"]["mutation.w_max"] == 0.0 for x in lines[:3])  # the experts, unmutated

    result = run_cli(path, "-o", run_dir, "--trials", 12)
    assert result.exit_code == 0, result.output
    after = json.loads((run_dir / "archives.json").read_text())
    assert after["generations"] > first["generations"]
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and len({x["number"] for x in lines}) == 12
    best = (run_dir / "best" / "mergekit_config.yml").read_text()
    assert "svd_mutation" in best


@pytest.mark.slow
def test_cycleqd_children_inherit_mutations_and_merge_trial_replays_them(ws, family, tmp_path):
    path = write_recipe(ws, family, sampler="cycleqd", name="cqd_lineage", trials=16, options="{children: 2}")
    run_dir = ws / "runs" / "cqd_lineage"
    assert run_cli(path, "-o", run_dir).exit_code == 0
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    heirs = [x for x in lines if "lineage" in x["config"]]
    assert heirs, "no child of a mutated parent in 16 trials"
    heir = heirs[-1]
    config = yaml.safe_load(heir["config"])
    tree = json.loads(config["parameters"]["lineage"])
    mutated = {int(ref[1:]) for ref in tree["nodes"]}
    assert all(lines[t]["point"]["mutation.w_max"] > 0 for t in mutated)  # ancestors carried whole are mutated ones
    out = tmp_path / "replayed"
    result = CliRunner().invoke(cli, ["merge", "--run", str(run_dir), "--trial", str(heir["number"]), str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    on_disk = safetensors.torch.load_file(out / "model.safetensors")
    merger = InMemoryMerger(MergeOptions(quiet=True))
    state = merger.materialize(MergeConfiguration.model_validate(config)).state_dict()
    assert all(torch.equal(state[k], v) for k, v in on_disk.items())
    # and the inherited mutation matters: the same config without its lineage is another model
    orphan = {**config, "parameters": {k: v for k, v in config["parameters"].items() if k != "lineage"}}
    other = merger.materialize(MergeConfiguration.model_validate(orphan)).state_dict()
    assert not torch.allclose(other["model.layers.0.mlp.down_proj.weight"],
                              on_disk["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.slow
def test_swarm_and_cma_runs_write_a_complete_run_folder(ws, family):
    for sampler, options in (("swarm", "{particles: 4}"), ("cma", "{popsize: 4}")):
        path = write_recipe(ws, family, sampler=sampler, name=f"{sampler}_run", trials=8, options=options,
                            two_objectives=False, params="parameters: {normalize: false}\n")
        run_dir = ws / "runs" / f"{sampler}_run"
        result = run_cli(path, "-o", run_dir)
        assert result.exit_code == 0, result.output
        report = json.loads((run_dir / "report.json").read_text())
        assert (run_dir / "best" / "model.safetensors").exists() and (run_dir / "plots" / "history.png").exists()
        lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
        assert report["winner"]["search"] == pytest.approx(max(x["value"] for x in lines if x["value"] is not None))
