"""Recipe parsing: annotations become typed dimensions; bad input names the file and line."""

import textwrap

import pytest

from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError

EVOLVE = """
evolve:
  trials: 3
  objectives: [{task: tiny_copy}]
"""


def write(tmp_path, body: str, evolve: str = EVOLVE):
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(body).lstrip() + evolve)
    return path


def test_annotations_become_dimensions(tmp_path, tiny_llama):
    base, v1, v2 = tiny_llama
    path = write(tmp_path, f"""
        merge_method: {{choice: [ties, dare_ties], init: ties}}
        base_model: {base}
        models:
          - model: {v1}
            parameters:
              weight: {{search: [0.0, 1.0], init: 0.25, name: w}}
              density:
                - filter: self_attn
                  value: {{search: [0.1, 1.0], log: true}}
                - value: {{search: [0.1, 1.0], points: 3}}
          - model: {v2}
            parameters:
              weight: {{var: w}}
              density: {{search: [1, 4], type: int}}
        parameters:
          normalize: {{choice: [true, false]}}
        """)
    recipe = load_recipe(path)
    dims = recipe.search_space.dimensions
    assert list(dims) == [
        "merge_method", "w", "v1.density[self_attn]", "v1.density[*]@0", "v1.density[*]@1",
        "v1.density[*]@2", "v2.density", "normalize",
    ]
    assert dims["merge_method"].kind == "categorical" and dims["merge_method"].init == "ties"
    assert dims["v1.density[self_attn]"].log
    assert dims["v2.density"].kind == "int"
    point = {**recipe.search_space.default_point(), "w": 0.7, "v1.density[*]@1": 0.2, "merge_method": "dare_ties"}
    config = recipe.compile(point)
    assert config.merge_method == "dare_ties"
    m1, m2 = config.models
    assert m1.parameters["weight"] == 0.7 and m2.parameters["weight"] == 0.7  # tied by name
    assert m1.parameters["density"][1].value == [0.55, 0.2, 0.55]  # a 3-point gradient
    assert m1.parameters["density"][0].filter == "self_attn"
    assert isinstance(m2.parameters["density"], int)


def test_plain_config_has_no_dimensions(tmp_path, tiny_llama):
    base, v1, _ = tiny_llama
    path = write(tmp_path, f"""
        merge_method: linear
        models:
          - {{model: {base}, parameters: {{weight: 0.5}}}}
          - {{model: {v1}, parameters: {{weight: 0.5}}}}
        """, evolve="")
    recipe = load_recipe(path)
    assert len(recipe.search_space) == 0 and recipe.evolve is None
    assert recipe.compile({}).models[1].parameters["weight"] == 0.5


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {search: [1.0, 0.0]}\n",
         5, "empty"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {search: [0, 1], init: 3}\n",
         5, "outside the search range"),
        ("merge_method: linearr\nmodels:\n  - model: a\n", 1, "unknown merge method 'linearr'"),
        ("merge_method: {choice: [ties, nope]}\nbase_model: a\nmodels:\n  - model: b\n", 1,
         "unknown merge method 'nope'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      wieght: 1.0\n", 5,
         "takes no parameter 'wieght'"),
        ("merge_method: linear\nmodels:\n  - model: {search: [0, 1]}\n", 3, "search annotation can stand for"),
        ("merge_method: linear\nmodelz:\n  - model: a\n", 2, "unknown key 'modelz'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {var: nowhere}\n", 5,
         "names no annotation"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {search: [0, 1], bogus: 1}\n", 5,
         "bad search annotation: 'bogus': Extra inputs are not permitted"),
        ("merge_method: linear\n\tmodels: x\n", 2, "not valid YAML"),
    ],
)
def test_errors_name_file_and_line(tmp_path, body, line, needle):
    path = tmp_path / "recipe.yml"
    path.write_text(body + EVOLVE)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == line, str(err.value)
    assert needle in str(err.value)
    assert str(err.value).startswith(f"{path.resolve()}:{line}:") or str(err.value).startswith(f"{path}:{line}:")


def test_evolve_errors_point_into_the_section(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\nevolve:\n  trials: 0\n  objectives: [{task: x}]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == 5 and "evolve.trials" in str(err.value)


def test_a_union_setting_is_named_as_the_user_wrote_it(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\nevolve:\n  batch_size: [64]\n"
                    "  objectives: [{task: x}]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line == 5
    assert "evolve.batch_size: Input should be a valid integer or a valid string" in str(err.value), str(err.value)


def test_annotations_need_an_evolve_section(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {search: [0, 1]}\n")
    with pytest.raises(RecipeError, match="no 'evolve:' section"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text("merge_method: !!python/object/apply:os.system ['echo pwned']\nmodels:\n  - model: a\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
