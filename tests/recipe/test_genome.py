"""mergekit-evolve genome files: translated into recipes that search the same configs."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.evo.config import EvolMergeConfiguration
from mergekit.evo.genome import ModelGenome
from mergekit.options import MergeOptions
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.overrides import Overrides
from mergekit_evolve.recipe.yaml_lines import RecipeError

BERT_GENOME = Path(__file__).resolve().parent / "data" / "mergekit-examples" / "pr451_evo_bert_large.yml"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bert_genome_translation_by_hand():
    recipe = load_recipe(BERT_GENOME)
    # genome: 12 models, dare_ties -> (weight, density) per model, layer_granularity 0 -> one group, no filters
    labels = [
        "bertimbau_hate_speech", "TuPy-Bert-Large-Binary-Classifier", "google-play-sentiment-analysis",
        "bert-large-uncased-Hate_Offensive_or_Normal_Speech", "bert-large-uncased-Twitter-toxicity",
        "baseline_nli_bert-large", "BERT-Ecommerce-Classification", "Intent-classification-BERT-Large-Ashu",
        "models[8]", "models[9]",  # two models named bert-large-finetuned-phishing: named by position
        "scam-detection", "bert-finetuned-phishing",
    ]
    assert list(recipe.search_space.dimensions) == [f"{m}.{p}" for m in labels for p in ("weight", "density")]
    for name, dim in recipe.search_space.dimensions.items():
        assert dim.kind == "float" and (dim.low, dim.high) == (0.0, 1.0)  # allow_negative_weights: false
        assert dim.init == (1 / 12 if name.endswith(".weight") else 1.0)  # mergekit-evolve's x0
    assert not any(pl.gradient for pl in recipe.search_space.placements)  # smooth: false

    config = recipe.compile(recipe.search_space.default_point())
    assert config.merge_method == "dare_ties" and config.dtype == "bfloat16"
    assert config.base_model.model.path == "neuralmind/bert-large-portuguese-cased"
    assert config.base_model.override_architecture == "BertModel"
    assert config.parameters == {"normalize": False, "int8_mask": True}  # normalize: false as written
    assert config.tokenizer_source is None
    assert [str(m.model) for m in config.models][:2] == ["Nelci/bertimbau_hate_speech",
                                                         "Silly-Machine/TuPy-Bert-Large-Binary-Classifier"]
    assert config.models[-1].model == config.base_model and config.models[-1].parameters is None

    evolve = recipe.evolve
    assert [(o.task, o.metric, o.weight, o.goal, o.limit, o.num_fewshot) for o in evolve.objectives] == [
        ("sentiment_pt", "acc,none", 1.0, "maximize", None, None)
    ]
    assert (evolve.sampler, evolve.trials, evolve.seed, evolve.apply_chat_template) == ("cma", 100, 0, True)


def test_migrate_writes_a_recipe_that_loads_to_the_same_search(tmp_path):
    out = tmp_path / "bert.yml"
    result = invoke("migrate", BERT_GENOME, "-o", out)
    assert result.exit_code == 0, result.output
    assert "24 search dimensions" in result.output
    text = out.read_text()
    assert text.startswith("# The recipe the mergekit-evolve genome file pr451_evo_bert_large.yml stands for")
    assert "weight: {search: [0.0, 1.0], init: 0.08333333333333333}" in text
    written, direct = load_recipe(out), load_recipe(BERT_GENOME)
    assert written.search_space.dimensions == direct.search_space.dimensions
    assert written.compile(written.search_space.default_point()) == direct.compile(direct.search_space.default_point())
    assert written.evolve == direct.evolve

    again = CliRunner().invoke(cli, ["migrate", str(BERT_GENOME), "-o", str(out)])
    assert again.exit_code == 1 and "exists; pass --force" in again.output
    assert invoke("migrate", BERT_GENOME, "-o", out, "--force").exit_code == 0


def test_migrate_refuses_a_plain_config(tmp_path):
    path = tmp_path / "plain.yml"
    path.write_text("merge_method: linear\nmodels: [{model: a}]\n")
    result = CliRunner().invoke(cli, ["migrate", str(path)])
    assert result.exit_code == 1 and "not a mergekit-evolve genome file (it has no 'genome:' section)" in result.output


def genome_file(folder: Path, family: list[Path], name: str = "genome", top: dict | None = None, **genome) -> Path:
    """A genome over the tiny family: ``genome`` keys go under ``genome:``, ``top`` beside it."""
    base, v1, v2 = family
    body = {"models": [str(v1), str(v2)], "base_model": str(base), **genome}
    data = {"genome": body, "tasks": [{"name": "tiny_copy", "metric": "acc,none"}], "limit": 4,
            "apply_chat_template": False, **(top or {})}
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def genotype_point(recipe, genome: ModelGenome, genotype: torch.Tensor) -> dict[str, float]:
    """The recipe point standing for a mergekit-evolve genotype [groups, models, filter sets, params].

    Dimensions come in recipe order: discrete slices group by group; models syntax model by
    model, then parameter, then filter set, then gradient point.
    """
    d = genome.definition
    if d.merge_method == "slerp":  # t of the first model; mergekit-evolve picks the heavier one as base
        values = []
        for group in genotype[:, :, 0, 0]:
            t = torch.softmax(torch.sort(group, descending=True).values, -1)[1].item()
            values.append(t if group[0] >= group[1] else 1 - t)
    elif d.smooth or genotype.shape[0] == 1:
        values = genotype.permute(1, 3, 2, 0).flatten().tolist()
    else:
        values = genotype.permute(0, 1, 3, 2).flatten().tolist()
    assert len(values) == len(recipe.search_space)
    return dict(zip(recipe.search_space.dimensions, values, strict=False))


GENOMES = {
    "discrete_groups_filters": dict(merge_method="task_arithmetic", layer_granularity=2, filters=["self_attn", "mlp"]),
    "smooth_negative_weights": dict(merge_method="ties", layer_granularity=1, smooth=True, allow_negative_weights=True,
                                    normalize=False),
    "one_group": dict(merge_method="dare_ties"),
    "smooth_filters_linear": dict(merge_method="linear", layer_granularity=2, smooth=True, filters=["mlp"],
                                  base_model=None),
    "slerp_groups": dict(merge_method="slerp", layer_granularity=2, base_model=None),
}


@pytest.mark.parametrize("name", sorted(GENOMES))
def test_translation_merges_what_mergekit_evolve_merges(tiny_llama, tmp_path, name):
    """For a random genotype, the recipe's config and mergekit-evolve's config give the same model."""
    path = genome_file(tmp_path, tiny_llama, **GENOMES[name])
    recipe = load_recipe(path)
    genome = ModelGenome(EvolMergeConfiguration.model_validate(yaml.safe_load(path.read_text())).genome)
    torch.manual_seed(1)
    genotype = torch.rand(genome.initial_genotype().shape)
    if GENOMES[name].get("allow_negative_weights"):
        genotype[..., 0] = genotype[..., 0] * 2 - 1  # weights in [-1, 1]
    ours = recipe.compile(genotype_point(recipe, genome, genotype))
    theirs = genome.genotype_merge_config(genotype)

    options = MergeOptions(random_seed=5, quiet=True)
    a = {k: v.clone() for k, v in InMemoryMerger(options).materialize(ours).state_dict().items()}
    b = InMemoryMerger(options).materialize(theirs).state_dict()
    assert set(a) == set(b)
    for key in a:
        if name.startswith("slerp"):  # slerp(t; A, B) and slerp(1 - t; B, A) differ in rounding only
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-2, rtol=1e-2), key
        else:
            assert torch.equal(a[key], b[key]), key


def test_translation_shapes(tiny_llama, tmp_path):
    groups = load_recipe(genome_file(tmp_path, tiny_llama, "g", merge_method="ties", layer_granularity=2,
                                     filters=["mlp"]))
    config = groups.compile(groups.search_space.default_point())
    assert [[s.layer_range for s in piece.sources] for piece in config.slices] == [[(0, 2)] * 3, [(2, 4)] * 3]
    assert config.slices[0].sources[0].parameters["weight"][0].filter == "mlp"
    assert len(groups.search_space) == 2 * 2 * 2 * 2  # groups x models x filter sets x (weight, density)

    smooth = load_recipe(genome_file(tmp_path, tiny_llama, "s", top={"random_init": True}, merge_method="linear",
                                     base_model=None, layer_granularity=1, smooth=True))
    config = smooth.compile(smooth.search_space.default_point())
    assert config.models[0].parameters["weight"] == [0.5] * 4  # a gradient of num_layers points, mid-range
    assert all(d.init is None for d in smooth.search_space.dimensions.values())  # random_init: no x0
    assert config.parameters == {"normalize": True}  # linear takes no int8_mask


@pytest.mark.parametrize(
    ("genome", "extra", "line", "needle"),
    [
        ({"merge_method": "nuslerp"}, {}, 6, "genome.merge_method: Invalid merge method"),
        ({"merge_method": "ties", "layer_granularity": 3}, {}, 7, "layer_granularity 3 does not divide the 4 layers"),
        ({"merge_method": "slerp", "smooth": True}, {}, 7, "smooth is not supported for slerp"),
        ({"merge_method": "linear"}, {"tasks": [{"name": "x", "weight": 0}]}, 7, "scores no task"),
        ({"merge_method": "ties", "base_model": None}, {}, 1, "base_model is required"),
    ],
)
def test_genome_errors_name_the_line(tiny_llama, tmp_path, genome, extra, line, needle):
    path = genome_file(tmp_path, tiny_llama, **genome)
    data = yaml.safe_load(path.read_text())
    data["genome"] = {k: v for k, v in data["genome"].items() if v is not None}
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert needle in str(err.value) and err.value.line == line, (str(err.value), path.read_text())


def test_slerp_over_three_models_is_refused(tiny_llama, tmp_path):
    base, v1, v2 = tiny_llama
    path = tmp_path / "g.yml"
    path.write_text(f"genome:\n  models:\n    - {base}\n    - {v1}\n    - {v2}\n  merge_method: slerp\ntasks: [t]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == 2 and "slerps the two highest-weighted models" in str(err.value)


def test_layer_granularity_needs_a_readable_config(tmp_path):
    path = tmp_path / "g.yml"
    path.write_text("genome:\n  models: [org/not-here-a, org/not-here-b]\n  merge_method: linear\n"
                    "  layer_granularity: 8\ntasks: [t]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == 4 and "layer_granularity needs the layer count of 'org/not-here-a'" in str(err.value)


def test_tasks_and_what_is_not_carried_over(tiny_llama, tmp_path, caplog):
    path = genome_file(tmp_path, tiny_llama, merge_method="linear", base_model=None)
    data = yaml.safe_load(path.read_text())
    data.update(tasks=["a", {"name": "b", "weight": -2, "metric": "perplexity,none"}, {"name": "c", "weight": 0}],
                limit=20, num_fewshot=3, shuffle=True, apply_chat_template=True, population=8)
    path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.WARNING):
        recipe = load_recipe(path)
    assert [o.model_dump(include={"task", "metric", "weight", "goal", "limit", "num_fewshot"})
            for o in recipe.evolve.objectives] == [
        {"task": "a", "metric": "acc,none", "weight": 1.0, "goal": "maximize", "limit": 20, "num_fewshot": 3},
        {"task": "b", "metric": "perplexity,none", "weight": 2.0, "goal": "minimize", "limit": 20, "num_fewshot": 3},
    ]
    for needle in ("task 'c' has weight 0", "shuffle: true has no equivalent", "fewshot_as_multiturn",
                   "unknown key 'population' is ignored"):
        assert needle in caplog.text


def test_mergekit_evolve_options_map_onto_the_recipe(tiny_llama, tmp_path, monkeypatch):
    recipe = load_recipe(genome_file(tmp_path, tiny_llama, merge_method="linear", base_model=None))
    monkeypatch.chdir(tmp_path)
    changed = Overrides(sigma0=0.1, task_paths=("tasks",), seed=9, batch_size=4).apply(recipe)
    assert changed.evolve.seed == 9 and changed.evolve.batch_size == 4
    assert changed.evolve.task_paths == [str(tmp_path / "tasks")]
    assert changed.evolve.sampler_options.given() == {"sigma0": 0.1}
    assert recipe.evolve.seed == 0  # the loaded recipe itself is untouched

    tpe = dataclasses.replace(recipe, evolve=recipe.evolve.model_copy(update={"sampler": "tpe"}))
    with pytest.raises(Exception, match="--sigma0 is CMA-ES's initial step size, but the recipe's sampler is 'tpe'"):
        Overrides(sigma0=0.1).apply(tpe)


def test_conflicting_old_and_new_options(tmp_path):
    result = CliRunner().invoke(cli, [str(tmp_path / "x.yml"), "--trials", "3", "--max-fevals", "5"])
    assert result.exit_code == 2 and "--max-fevals is mergekit-evolve's name for --trials" in result.output
    result = CliRunner().invoke(cli, [str(tmp_path / "x.yml"), "-o", "a", "--storage-path", "b"])
    assert result.exit_code == 2 and "--storage-path is mergekit-evolve's name for --run-dir" in result.output


@pytest.mark.slow
def test_tiny_genome_runs_with_mergekit_evolve_options(tiny_llama, tmp_path, monkeypatch):
    write_copy_task(tmp_path)
    path = genome_file(tmp_path, tiny_llama, merge_method="task_arithmetic", layer_granularity=2, filters=["mlp"])
    monkeypatch.chdir(tmp_path)
    # the tiny random models all score 0 on the copy task, and a genome file cannot set
    # evolve.allow_constant_objectives: this test is about the options, so the check is skipped
    monkeypatch.setattr("mergekit_evolve.pipeline._check_objectives_vary", lambda recipe, worker: None)
    result = invoke(path, "--storage-path", "run", "--max-fevals", 3, "--task-search-path", "tasks",
                    "--random-seed", 5, "--batch-size", 4, "--sigma0", 0.2, "--no-progress")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in records] == ["COMPLETE"] * 3
    assert len(records[0]["point"]) == 2 * 2 * 2  # layer groups x models x (mlp, rest); task_arithmetic: weight
    assert set(records[0]["point"].values()) == {0.5}  # the first trial is mergekit-evolve's x0: 1/#models
    first = yaml.safe_load(records[0]["config"])
    assert [[s["layer_range"] for s in piece["sources"]] for piece in first["slices"]] == [[[0, 2]] * 3, [[2, 4]] * 3]
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
