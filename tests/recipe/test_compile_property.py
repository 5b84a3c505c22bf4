"""Property: every point of a recipe's space compiles to a config mergekit accepts and can plan."""

import textwrap

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.architecture import get_architecture_info
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions

from mergekit_evolve.merge.engine import InMemoryPlanner
from mergekit_evolve.recipe.document import load_recipe

EVOLVE = "evolve:\n  objectives: [{task: tiny_copy}]\n"

RECIPES = {
    "dare_ties": """
        merge_method: {{choice: [ties, dare_ties, della]}}
        base_model: {base}
        parameters:
          normalize: {{choice: [true, false]}}
        models:
          - model: {v1}
            parameters:
              weight: {{search: [0.0, 1.0], points: 3}}
              density: [{{filter: mlp, value: {{search: [0.05, 1.0], log: true}}}}, {{value: {{search: [0.1, 1.0]}}}}]
          - model: {v2}
            parameters:
              weight: {{search: [-0.5, 1.5]}}
              density: {{search: [0.1, 1.0], name: d}}
              epsilon: 0.01
    """,
    "slerp": """
        merge_method: slerp
        base_model: {v1}
        slices:
          - sources:
              - {{model: {v1}, layer_range: [0, {{search: [1, 4], type: int, name: end}}]}}
              - {{model: {v2}, layer_range: [0, {{var: end}}]}}
        parameters:
          t: [{{filter: self_attn, value: {{search: [0, 1], points: 4}}}}, {{value: {{search: [0, 1]}}}}]
    """,
    "linear": """
        merge_method: {{choice: [linear, task_arithmetic]}}
        base_model: {base}
        models:
          - {{model: {base}, parameters: {{weight: 1.0}}}}
          - {{model: {v1}, parameters: {{weight: {{search: [0.01, 2.0], log: true}}}}}}
          - {{model: {v2}, parameters: {{weight: {{search: [0, 10], type: int, step: 2}}}}}}
    """,
}


def draw_point(data, recipe):
    point = {}
    for name, dim in recipe.search_space.dimensions.items():
        if dim.kind == "categorical":
            point[name] = data.draw(st.sampled_from(dim.choices), label=name)
        elif dim.kind == "int":
            point[name] = data.draw(st.integers(int(dim.low), int(dim.high)), label=name)
        else:
            point[name] = data.draw(st.floats(dim.low, dim.high, allow_nan=False), label=name)
    return point


def make_test(key):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test(data, tiny_llama, tmp_path):
        base, v1, v2 = tiny_llama
        path = tmp_path / f"{key}.yml"
        path.write_text(textwrap.dedent(RECIPES[key].format(base=base, v1=v1, v2=v2)).lstrip() + EVOLVE)
        recipe = load_recipe(path)
        config = recipe.compile(draw_point(data, recipe))
        options = MergeOptions()
        arch = get_architecture_info(config, options)
        planned = InMemoryPlanner(config, arch, options, _model_out_config(config, arch)).plan_in_memory()
        assert planned, "mergekit planned no tensors"

    return test


test_dare_ties_family = make_test("dare_ties")
test_slerp_slices_with_int_and_tied_vars = make_test("slerp")
test_linear_log_and_step = make_test("linear")
