"""Plain mergekit configs are recipes with zero dimensions that compile to what mergekit parses."""

import logging
import re
import socket
from pathlib import Path
from string import Template

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_evolve.cli import cli
from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.genome import is_genome
from mergekit_evolve.recipe.yaml_lines import RecipeError

CORPUS = Path(__file__).resolve().parent / "data" / "mergekit-examples"
CORPUS_FILES = sorted(CORPUS.glob("*.yml"))
CONFIG_FILES = [p for p in CORPUS_FILES if not is_genome(yaml.safe_load(p.read_text()))]

# One config per merge method mergekit 0.1.5 registers, using every parameter the method takes.
METHODS = {
    "linear": """
        merge_method: linear
        models:
          - {model: $a, parameters: {weight: 0.6}}
          - {model: $b, parameters: {weight: 0.4}}
        parameters: {normalize: true}
        """,
    "slerp": """
        merge_method: slerp
        base_model: $a
        models: [{model: $a}, {model: $b}]
        parameters: {t: 0.3}
        """,
    "nuslerp": """
        merge_method: nuslerp
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.5}}
          - {model: $b, parameters: {weight: 0.7}}
        parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}
        """,
    "multislerp": """
        merge_method: multislerp
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.5}}
          - {model: $b, parameters: {weight: 0.3}}
        parameters: {normalize_weights: true, eps: 1.0e-8}
        """,
    "karcher": """
        merge_method: karcher
        models: [{model: $a}, {model: $b}]
        parameters: {max_iter: 5, tol: 1.0e-5}
        """,
    "passthrough": """
        merge_method: passthrough
        slices:
          - sources: [{model: $a, layer_range: [0, 2]}]
          - sources: [{model: $b, layer_range: [1, 4], parameters: {scale: [{filter: down_proj, value: 0.5}, {value: 1.0}]}}]
        """,  # noqa: E501
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7}}
          - {model: $b, parameters: {weight: 0.3, density: 1.0}}
        parameters: {normalize: false, int8_mask: true, rescale: false, lambda: 1.2}
        """,
    "ties": """
        merge_method: ties
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.5}}
          - {model: $b, parameters: {weight: 0.5, density: 0.7}}
        parameters: {normalize: true, int8_mask: true, rescale: false, lambda: 1.0}
        """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.5}}
          - {model: $b, parameters: {weight: 0.5, density: 0.7}}
        parameters: {normalize: false, int8_mask: true, rescale: true, lambda: 1.1}
        """,
    "dare_linear": """
        merge_method: dare_linear
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.5}}
          - {model: $b, parameters: {weight: 0.5, density: 0.7}}
        parameters: {normalize: true, int8_mask: false, rescale: true, lambda: 1.0}
        """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.9, gamma: 0.01}}
          - {model: $b, parameters: {weight: 0.5, density: 0.8, gamma: 0.02}}
        parameters: {normalize: false, int8_mask: false, rescale: false, lambda: 1.0}
        """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.9, gamma: 0.01}}
          - {model: $b, parameters: {weight: 0.5, density: 0.8, gamma: 0.02}}
        parameters: {normalize: true, int8_mask: true, rescale: false, lambda: 1.0}
        """,
    "della": """
        merge_method: della
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.5, epsilon: 0.1}}
          - {model: $b, parameters: {weight: 0.5, density: 0.6, epsilon: 0.15}}
        parameters: {normalize: true, int8_mask: false, rescale: true, lambda: 0.9}
        """,
    "della_linear": """
        merge_method: della_linear
        base_model: $base
        models:
          - {model: $a, parameters: {weight: 0.7, density: 0.5, epsilon: 0.1}}
          - {model: $b, parameters: {weight: 0.5, density: 0.6, epsilon: 0.15}}
        parameters: {normalize: false, int8_mask: false, rescale: true, lambda: 1.0}
        """,
    "sce": """
        merge_method: sce
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {select_topk: 0.5, int8_mask: false}
        """,
    "ram": """
        merge_method: ram
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {epsilon: 1.0e-5}
        """,
    "ramplus_tl": """
        merge_method: ramplus_tl
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {r: 0.1, alpha: 0.2, epsilon: 1.0e-5}
        """,
    "model_stock": """
        merge_method: model_stock
        base_model: $base
        models: [{model: $a}, {model: $b}]
        parameters: {filter_wise: false}
        """,
    "nearswap": """
        merge_method: nearswap
        base_model: $a
        models: [{model: $a}, {model: $b}]
        parameters: {t: 0.5}
        """,
    "arcee_fusion": """
        merge_method: arcee_fusion
        base_model: $a
        models: [{model: $a}, {model: $b}]
        """,
}

# mergekit syntax beyond one flat list of models
FEATURES = {
    "gradients": """
        merge_method: ties
        base_model: $base
        models:
          - {model: $a, parameters: {weight: [0.1, 0.9, 0.4], density: [1, 0.7, 0.1]}}
          - {model: $b, parameters: {weight: 0.5, density: 0.5}}
        dtype: float16
        out_dtype: bfloat16
        """,
    "filters": """
        merge_method: task_arithmetic
        base_model: $base
        models:
          - model: $a
            parameters:
              weight:
                - {filter: self_attn, value: [0.0, 0.5, 1.0]}
                - {filter: mlp, value: 0.3}
                - {filter: "*", value: 0.8}
          - model: $b
            parameters:
              weight: [{value: 0.2}]
        """,
    "slices": """
        merge_method: slerp
        base_model: $a
        slices:
          - sources:
              - {model: $a, layer_range: [0, 2]}
              - {model: $b, layer_range: [0, 2]}
            parameters: {t: [{filter: self_attn, value: [0, 0.5]}, {value: 0.5}]}
          - sources:
              - {model: $a, layer_range: [2, 4]}
              - {model: $b, layer_range: [2, 4]}
            base_model: $b
            residual_weight: 0.1
            parameters: {t: 0.7}
        """,
    "modules": """
        merge_method: linear
        modules:
          default:
            models:
              - {model: $a, parameters: {weight: 0.3}}
              - {model: $b, parameters: {weight: [0.1, 0.9]}}
            parameters: {normalize: true}
        """,
    "modules_slices": """
        merge_method: passthrough
        modules:
          text_decoder:
            slices:
              - sources: [{model: $a, layer_range: [0, 4], parameters: {scale: 0.5}}]
          vision_tower:
            models: [{model: $b}]
        """,
    "tokenizer_block": """
        merge_method: linear
        models:
          - {model: $a, parameters: {weight: 1.0}}
          - {model: $b, parameters: {weight: 1.0}}
        tokenizer:
          source: union
          tokens:
            "<|im_start|>": {source: $a}
            "<|im_end|>": {source: {kind: model_token, model: $b, token: "</s>"}}
            "<pad>": {source: {kind: zero}, force: true}
          pad_to_multiple_of: 64
        chat_template: chatml
        """,
    "tokenizer_source": """
        merge_method: task_arithmetic
        base_model: $base
        models: [{model: $a, parameters: {weight: 0.5}}]
        tokenizer_source: base
        chat_template: "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        """,
    "model_reference_forms": """
        merge_method: linear
        models:
          - {model: "$a@main", parameters: {weight: 0.5}}
          - {model: {model: $b, override_architecture: LlamaForCausalLM}, parameters: {weight: 0.5}}
        """,
}
HUB_NAMES = {"base": "org/base-7b", "a": "org/expert-a", "b": "org/expert-b"}


def _write(tmp_path: Path, name: str, text: str, **names: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(Template(text).substitute(names))
    return path


def _assert_compiles_as_mergekit_parses(path: Path) -> None:
    recipe = load_recipe(path)
    assert len(recipe.search_space) == 0 and recipe.evolve is None
    compiled = recipe.compile({})
    assert compiled.model_dump() == MergeConfiguration.model_validate(yaml.safe_load(path.read_text())).model_dump()


def test_corpus_ships_with_the_tests():
    # an empty parametrize list would skip the corpus tests silently, as they once did in CI
    assert CONFIG_FILES and len(CORPUS_FILES) > len(CONFIG_FILES), CORPUS


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_corpus_config_is_a_recipe_without_dimensions(path):
    _assert_compiles_as_mergekit_parses(path)


def _dry_run(path: Path) -> tuple[str, MergeConfiguration]:
    result = CliRunner().invoke(cli, [str(path), "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = result.output.split("# one compiled config", 1)[1].split("\n", 1)[1].split("\n# sampler:", 1)[0]
    return result.output, MergeConfiguration.model_validate(yaml.safe_load(printed))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.name for p in CORPUS_FILES])
def test_corpus_dry_run_validates_without_downloading(path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"the dry run opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    if path in CONFIG_FILES:
        output, printed = _dry_run(path)
        assert re.search(r"\b0\s+dimensions", output)
        assert printed.model_dump() == MergeConfiguration.model_validate(yaml.safe_load(path.read_text())).model_dump()
    else:  # the genome file: translated (see test_genome.py for its dimensions); its custom task is not shipped
        result = CliRunner().invoke(cli, [str(path), "--dry-run"], catch_exceptions=False)
        assert result.exit_code == 1
        assert f"{path}:28: lm-eval cannot find task(s) ['sentiment_pt']" in " ".join(result.output.split())


def test_every_registered_method_is_covered():
    ours = set(register_plugins())  # this package's methods, not mergekit's
    assert set(METHODS) == {m.spec.name for m in merge_methods.registered_methods()} - ours


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(FEATURES))
def test_written_config_compiles_as_mergekit_parses(tmp_path, caplog, name):
    path = _write(tmp_path, name, {**METHODS, **FEATURES}[name], **HUB_NAMES)
    with caplog.at_level(logging.WARNING):
        _assert_compiles_as_mergekit_parses(path)
    assert "ignores parameter" not in caplog.text  # every parameter used is one the method takes


def test_local_model_folders_become_absolute(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    path = _write(tmp_path, "local", METHODS["linear"], a="models/a", b="org/expert-b")
    config = load_recipe(path).compile({})
    assert [m.model.model.path for m in config.models] == [str((tmp_path / "models" / "a").resolve()), "org/expert-b"]


def test_annotations_inside_modules_and_slices(tmp_path):
    path = tmp_path / "annotated.yml"
    path.write_text(
        "merge_method: linear\n"
        "modules:\n"
        "  default:\n"
        "    slices:\n"
        "      - sources:\n"
        "          - {model: org/a, layer_range: [0, {search: [2, 4], type: int}], "
        "parameters: {weight: {search: [0, 1]}}}\n"
        "          - {model: org/b, layer_range: [0, 4], "
        "parameters: {weight: [{filter: mlp, value: {search: [0, 1]}}, {value: 0.5}]}}\n"
        "evolve:\n  objectives: [{task: t}]\n"
    )
    recipe = load_recipe(path)
    assert len(recipe.search_space) == 3
    point = {name: (3 if dim.kind == "int" else 0.25) for name, dim in recipe.search_space.dimensions.items()}
    config = recipe.compile(point)
    sources = config.modules["default"].slices[0].sources
    assert sources[0].layer_range == (0, 3) and sources[0].parameters["weight"] == 0.25
    assert sources[1].parameters["weight"][0].value == 0.25


def test_real_parameter_of_another_method_is_ignored_with_a_warning(tmp_path, caplog):
    # mergekit ignores it, and configs in the wild carry such leftovers: load, but say so
    path = tmp_path / "leftover.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: org/a\n    parameters:\n      weight: 1.0\n"
                    "      density: 0.5\nparameters:\n  int8_mask: true\n")
    with caplog.at_level(logging.WARNING):
        recipe = load_recipe(path)
    assert recipe.compile({}).models[0].parameters["density"] == 0.5
    assert f"{path.resolve()}:6: merge method linear ignores parameter 'density'" in caplog.text
    assert ":8: merge method linear ignores parameter 'int8_mask'" in caplog.text


def test_parameter_no_method_takes_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / "typo.yml"
    path.write_text("merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters:\n"
                    "      densty: 0.5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == 6
    assert "takes no parameter 'densty', nor does any other method (did you mean 'density'?)" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS) + ["modules", "slices", "gradients", "filters"])
def test_every_method_merges_in_memory_as_run_merge_writes(tiny_llama, tmp_path, name):
    base, a, b = tiny_llama
    path = _write(tmp_path, name, {**METHODS, **FEATURES}[name], base=str(base), a=str(a), b=str(b))
    config = load_recipe(path).compile({})
    options = MergeOptions(random_seed=7, quiet=True)
    run_merge(config, str(tmp_path / "out"), options=options)
    on_disk = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    state = InMemoryMerger(options).materialize(config).state_dict()
    assert set(on_disk) == set(state)
    for key, tensor in on_disk.items():
        assert torch.equal(state[key], tensor), key
