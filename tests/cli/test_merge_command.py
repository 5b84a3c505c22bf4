"""`mergekit-evolve merge`: mergekit-yaml with plugins, and any stored trial reproduces its model."""

import json
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registry
from mergekit.options import MergeOptions
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.commands.merge import trial_config
from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.methods import registry as plugins


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def weights(folder):
    return safetensors.torch.load_file(folder / "model.safetensors")


def test_plain_config_merges_as_mergekit_yaml_does(tiny_llama, tmp_path, monkeypatch):
    base, v1, v2 = tiny_llama
    (tmp_path / "models").symlink_to(v1.parent)
    config_text = textwrap.dedent(f"""
        merge_method: ties
        base_model: models/{base.name}
        models:
          - {{model: models/{v1.name}, parameters: {{weight: [0.2, 0.8], density: 0.6}}}}
          - {{model: {v2}, parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.3}}, {{value: 0.9}}]}}}}
        parameters: {{normalize: false}}
        dtype: float32
        """)
    (tmp_path / "cfg.yml").write_text(config_text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # model folders are relative to the config, as in a recipe
    result = invoke("merge", tmp_path / "cfg.yml", tmp_path / "out", "--copy-tokenizer", "--no-write-model-card")
    assert result.exit_code == 0, result.output

    monkeypatch.chdir(tmp_path)  # mergekit-yaml resolves them against the working directory
    reference = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    # (no card: mergekit asks the Hub whether a relative local path is a repo id, offline an error)
    run_merge(reference, str(tmp_path / "ref"), options=MergeOptions(quiet=True, write_model_card=False))
    ours, theirs = weights(tmp_path / "out"), weights(tmp_path / "ref")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (tmp_path / "out" / "tokenizer.json").exists() and not (tmp_path / "out" / "README.md").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cfg.yml"], "expected CONFIG OUT_PATH, got 1 path"),
        (["--trial", "1", "out"], "--trial and --run go together"),
        (["--trial", "1", "--run", ".", "cfg.yml", "out"], "expected --trial N --run RUN_DIR OUT_PATH, got 2 path"),
    ],
)
def test_usage_errors(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yml").write_text("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    result = CliRunner().invoke(cli, ["merge", *args])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_a_recipe_with_annotations_is_refused_at_its_line(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {search: [0, 1]}\n"
                    "evolve:\n  objectives: [{task: t}]\n")
    result = CliRunner().invoke(cli, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{path.resolve()}:5: the config has 1 search dimensions (a.weight...)" in result.output
    assert "--trial N --run RUN_DIR" in result.output and not (tmp_path / "out").exists()


def test_a_genome_file_is_refused(tmp_path):
    path = tmp_path / "genome.yml"
    path.write_text("genome:\n  models: [a, b]\n  merge_method: linear\ntasks: [t]\n")
    result = CliRunner().invoke(cli, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1 and "mergekit-evolve genome file describes a search" in result.output


def _fake_run(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.mark.parametrize(
    ("trial", "needle"),
    [(7, "the run has no trial 7 (it has trials 0..1)"),
     (1, "trial 1 (FAIL) stored no config; it failed before compiling: ValueError: bad point")],
)
def test_trial_errors(tmp_path, trial, needle):
    run = _fake_run(tmp_path, [
        {"number": 0, "state": "COMPLETE", "config": "merge_method: linear\nmodels: [{model: a}]\n"},
        {"number": 1, "state": "FAIL", "config": None, "error": "ValueError: bad point"},
    ])
    result = CliRunner().invoke(cli, ["merge", "--trial", str(trial), "--run", str(run), str(tmp_path / "out")])
    assert result.exit_code == 1 and needle in result.output, result.output


def test_run_folder_without_trials(tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--trial", "0", "--run", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1 and "no trials.jsonl: not a mergekit-evolve run folder" in result.output


PLUGIN = '''
import torch
from mergekit.merge_methods import TensorBatch, merge_method, register


@merge_method(name="tiny_plugin_mean", pretty_name="Mean of the inputs")
def tiny_plugin_mean(batch: TensorBatch) -> torch.Tensor:
    return torch.stack(batch.tensors).mean(0)


register(tiny_plugin_mean)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A stand-in for ``mergekit_evolve.methods``: a module that registers one merge method."""
    (tmp_path / "evolve_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "METHODS_MODULE", "evolve_test_plugin")
    yield "evolve_test_plugin"
    registry._METHODS.pop("tiny_plugin_mean", None)  # leave mergekit's registry as it was
    sys.modules.pop("evolve_test_plugin", None)


def test_register_plugins_imports_the_methods_module_once(plugin_module, monkeypatch):
    assert plugins.register_plugins.__wrapped__() == ("tiny_plugin_mean",)
    # imported once, so calling again registers nothing twice (mergekit would raise)
    assert plugins.register_plugins.__wrapped__() == ("tiny_plugin_mean",)
    monkeypatch.setattr(plugins, "METHODS_MODULE", "mergekit_evolve.no_such_methods")
    assert plugins.register_plugins.__wrapped__() == ()


def test_a_plugin_method_merges(plugin_module, tiny_llama, tmp_path):
    plugins.register_plugins.__wrapped__()
    _, v1, v2 = tiny_llama
    (tmp_path / "cfg.yml").write_text(f"merge_method: tiny_plugin_mean\nmodels: [{{model: {v1}}}, {{model: {v2}}}]\n")
    result = invoke("merge", tmp_path / "cfg.yml", tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged, a, b = weights(tmp_path / "out"), weights(v1), weights(v2)
    for key in a:
        assert torch.allclose(merged[key], (a[key] + b[key]) / 2), key


@pytest.mark.slow
def test_stored_trial_merges_to_the_weights_it_was_scored_with(tiny_llama, tmp_path):
    base, v1, v2 = tiny_llama
    write_copy_task(tmp_path)
    recipe = tmp_path / "dare.yml"
    recipe.write_text(textwrap.dedent(f"""
        merge_method: dare_ties
        base_model: {base}
        models:
          - {{model: {v1}, parameters: {{weight: {{search: [0.2, 1.0]}}, density: {{search: [0.3, 0.9]}}}}}}
          - {{model: {v2}, parameters: {{weight: {{search: [0.2, 1.0]}}, density: 0.5}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: random
          trials: 3
          seed: 3
          objectives: [{{task: tiny_copy, metric: "acc,none", limit: 4, heldout_limit: 4}}]
          task_paths: [tasks]
        """))
    run = tmp_path / "run"
    assert invoke(recipe, "-o", run, "--no-progress").exit_code == 0
    record = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()][1]
    assert record["number"] == 1 and record["state"] == "COMPLETE"

    result = invoke("merge", "--trial", 1, "--run", run, tmp_path / "trial1")
    assert result.exit_code == 0, result.output
    assert "the run's seed 3" in result.output
    config = trial_config(run, 1)
    assert config.to_yaml() == record["config"].rstrip()
    resident = InMemoryMerger(MergeOptions(random_seed=3, quiet=True)).materialize(config).state_dict()
    merged = weights(tmp_path / "trial1")
    assert set(merged) == set(resident)
    for key, tensor in merged.items():
        assert torch.equal(resident[key], tensor), key

    # DARE drops at random: another seed is another model, so the run's seed is what reproduces the trial
    assert invoke("merge", "--trial", 1, "--run", run, "--random-seed", 4, tmp_path / "seed4").exit_code == 0
    other = weights(tmp_path / "seed4")
    assert any(not torch.equal(other[k], merged[k]) for k in merged)
