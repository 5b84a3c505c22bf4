"""The routing block: dimensions, the paper's decoding, length repair, the compiled config, bad input."""

import pytest
import transformers

from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.routing import Routing, open_slots
from mergekit_evolve.recipe.yaml_lines import RecipeError

EVOLVE = "evolve:\n  objectives: [{task: unused}]\n"


def recipe_text(models, extra="", method="passthrough"):
    return (
        f"merge_method: {method}\n"
        "routing:\n"
        f"  models: [{', '.join(str(m) for m in models)}]\n"
        f"{extra}"
        "dtype: float32\n" + EVOLVE
    )


def load(tmp_path, text):
    path = tmp_path / "r.yml"
    path.write_text(text)
    return load_recipe(path)


def indicator_names(recipe):
    return [n for n in recipe.search_space.dimensions if n.startswith("routing.r") and not n.endswith(".scale")]


def test_dimensions_and_init_is_the_papers(tiny_llama, tmp_path):
    _, v1, v2 = tiny_llama
    recipe = load(tmp_path, recipe_text([v1, v2], "  repeats: 3\n  scales: [0.5, 2.0]\n"))
    names = indicator_names(recipe)
    assert len(names) == 8 * 3  # M x r
    assert names[:5] == ["routing.r0.v1.L0", "routing.r0.v1.L1", "routing.r0.v1.L2", "routing.r0.v1.L3",
                         "routing.r0.v2.L0"]
    assert names[-1] == "routing.r2.v2.L3"
    assert len(recipe.search_space) == 24 + 8 * 8 + 1  # the indicator, the paper's W (M x M), the embedding's hop
    assert all(recipe.search_space.dimensions[n].low == -1.0 and recipe.search_space.dimensions[n].high == 1.0
               for n in names)
    # the paper's init: I = 0 except A's first-repetition layers at 2 sigma0 = 0.2 (A's forced ends need no slot)
    init = {n: recipe.search_space.dimensions[n].init for n in names}
    assert init == {n: (0.2 if n in ("routing.r0.v1.L1", "routing.r0.v1.L2") else 0.0) for n in names}
    assert {d.init for n, d in recipe.search_space.dimensions.items() if n.startswith("routing.W.")} == {1.0}
    # the init point (first trial, dry-run config) is model A unchanged
    config = recipe.compile(recipe.search_space.default_point())
    assert ([(str(s.sources[0].model), s.sources[0].layer_range) for s in config.slices]
            == [(str(v1), (i, i + 1)) for i in range(4)])
    assert all(s.sources[0].parameters is None for s in config.slices)
    assert str(config.base_model) == str(v1)


def test_compiled_config_pinned(tiny_llama, tmp_path):
    """Two 4-layer models, r = 2: M = 8, T = 16; slots 2, 5, 9, 12 open."""
    _, v1, v2 = tiny_llama
    recipe = load(tmp_path, recipe_text([v1, v2], "  repeats: 2\n  scales: [0.5, 2.0]\n  scale_form: slot\n"))
    names = indicator_names(recipe)
    assert len(recipe.search_space) == 2 * 16 + 2  # indicator, a scale per slot, the hops into the forced ends
    point = {n: -0.3 for n in names} | {f"{n}.scale": 1.0 for n in names} | {"routing.last.scale": 1.75,
                                                                             "routing.first.scale": 1.0}
    for slot, value, scale in [(2, 0.9, 0.6), (5, 0.1, 1.5), (9, 0.4, 0.8), (12, 0.7, 1.2)]:
        point[names[slot]] = value
        point[f"{names[slot]}.scale"] = scale
    point[f"{names[3]}.scale"] = 1.9  # a closed slot's scale is never used

    # path: v1 L0 (forced), slot 2 = v1 L2, slot 5 = v2 L1, slot 9 = 9 mod 8 = v1 L1,
    # slot 12 = 12 mod 8 = v2 L0, v1 L3 (forced); each scale sits on the previous hop's down_proj
    def hop(model, layer, scale=None):
        source = {"model": str(model), "layer_range": [layer, layer + 1]}
        if scale is not None:
            source["parameters"] = {"scale": [{"filter": "down_proj", "value": scale}]}
        return {"sources": [source]}

    expected = {
        "merge_method": "passthrough",
        "base_model": str(v1),
        "dtype": "float32",
        "slices": [hop(v1, 0, 0.6), hop(v1, 2, 1.5), hop(v2, 1, 0.8), hop(v1, 1, 1.2), hop(v2, 0, 1.75), hop(v1, 3)],
    }
    got = recipe.compile(point).model_dump(mode="json", exclude_none=True)
    assert got == expected


def test_w_scales_a_hop_by_the_layers_it_leaves_and_enters(tiny_llama, tmp_path):
    """The same path as above; W_ij scales the hop from layout layer i to layout layer j
    (v1 L0-3 = 0-3, v2 L0-3 = 4-7)."""
    _, v1, v2 = tiny_llama
    recipe = load(tmp_path, recipe_text([v1, v2], "  repeats: 2\n  scales: [0.5, 2.0]\n"))
    names = indicator_names(recipe)
    layers = ["v1.L0", "v1.L1", "v1.L2", "v1.L3", "v2.L0", "v2.L1", "v2.L2", "v2.L3"]
    point = {n: -0.3 for n in names} | {f"routing.W.{a}.{b}": 1.0 for a in layers for b in layers}
    point["routing.W.embed.v1.L0"] = 1.0
    for slot in (2, 5, 9, 12):
        point[names[slot]] = 0.5
    # path v1 L0 -> v1 L2 -> v2 L1 -> v1 L1 -> v2 L0 -> v1 L3: hops (0,2) (2,5) (5,1) (1,4) (4,3)
    for (i, j), w in {(0, 2): 0.6, (2, 5): 1.5, (5, 1): 0.8, (1, 4): 1.2, (4, 3): 1.75}.items():
        point[f"routing.W.{layers[i]}.{layers[j]}"] = w
    point["routing.W.v1.L2.v1.L0"] = 1.9  # W is not symmetric: the reverse hop is another number
    point["routing.W.v2.L1.v1.L2"] = 0.51

    def hop(model, layer, scale=None):
        source = {"model": str(model), "layer_range": [layer, layer + 1]}
        if scale is not None:
            source["parameters"] = {"scale": [{"filter": "down_proj", "value": scale}]}
        return {"sources": [source]}

    got = recipe.compile(point).model_dump(mode="json", exclude_none=True)["slices"]
    assert got == [hop(v1, 0, 0.6), hop(v1, 2, 1.5), hop(v2, 1, 0.8), hop(v1, 1, 1.2), hop(v2, 0, 1.75), hop(v1, 3)]
    # one number for a layer pair, whichever slots (repetitions) the two layers sit in
    again = dict(point)
    for slot in (2, 5, 9, 12):
        again[names[slot]] = -0.3
    again[names[8 + 2]], again[names[8 + 5]] = 0.5, 0.5  # v1 L2 and v2 L1 from the second repetition
    got = recipe.compile(again).model_dump(mode="json", exclude_none=True)["slices"]
    assert got == [hop(v1, 0, 0.6), hop(v1, 2, 1.5), hop(v2, 1), hop(v1, 3)]  # W[v2 L1, v1 L3] = 1: no scale


def test_the_hop_from_the_embedding_scales_the_embedding_unless_the_head_is_tied(tiny_llama, tmp_path):
    from tiny_models import make_family

    _, v1, v2 = tiny_llama
    for form, name in (("matrix", "routing.W.embed.v1.L0"), ("slot", "routing.first.scale")):
        recipe = load(tmp_path, recipe_text([v1, v2], f"  scales: [0.5, 2.0]\n  scale_form: {form}\n"))
        assert recipe.search_space.dimensions[name].init == 1.0
        config = recipe.compile(recipe.search_space.default_point() | {name: 1.25}).model_dump(
            mode="json", exclude_none=True)
        assert config["parameters"] == {"scale": [{"filter": "embed_tokens", "value": 1.25}]}
        assert all("parameters" not in s["sources"][0] for s in config["slices"])  # the path is A's, unscaled
    assert "parameters" not in recipe.compile(recipe.search_space.default_point()).model_dump(exclude_none=True)
    off = load(tmp_path, recipe_text([v1, v2], "  scales: [0.5, 2.0]\n  embed_filter: []\n"))
    assert not [n for n in off.search_space.dimensions if "embed" in n]
    # GPT-2 adds its positions to the token embedding: both scale; tied to the head, neither can
    gpt2 = make_family(tmp_path / "gpt2", "gpt2", variants=1)
    recipe = load(tmp_path, recipe_text(gpt2, "  scales: [0.5, 2.0]\n"))
    config = recipe.compile(recipe.search_space.default_point() | {"routing.W.embed.base.L0": 0.75})
    assert config.model_dump(mode="json", exclude_none=True)["parameters"] == {
        "scale": [{"filter": "wte", "value": 0.75}, {"filter": "wpe", "value": 0.75}]}
    from tiny_models import CONFIGS

    config = CONFIGS["llama"]()
    config.tie_word_embeddings = True
    tied = make_family(tmp_path / "tied", config=config, variants=1)
    assert not [n for n in load(tmp_path, recipe_text(tied, "  scales: [0.5, 2.0]\n")).search_space.dimensions
                if "embed" in n]
    with pytest.raises(RecipeError, match="parameters.scale cannot be used with routing.scales"):
        load(tmp_path, recipe_text([v1, v2], "  scales: [0.5, 2.0]\n") + "parameters: {scale: 2.0}\n")


def test_scale_tensor_is_chosen_per_architecture_or_refused(tmp_path):
    from tiny_models import make_family

    gpt2 = make_family(tmp_path / "gpt2", "gpt2", variants=1)
    recipe = load(tmp_path, recipe_text(gpt2, "  scales: [0.5, 2.0]\n"))
    point = recipe.search_space.default_point() | {"routing.W.base.L0.base.L1": 1.5}  # the path is A: L0 -> L1 -> ...
    slices = recipe.compile(point).model_dump(mode="json", exclude_none=True)["slices"]
    assert slices[0]["sources"][0]["parameters"] == {"scale": [{"filter": "mlp.c_proj", "value": 1.5}]}
    gemma = make_family(tmp_path / "gemma2", "gemma2", variants=1)
    with pytest.raises(RecipeError, match="cannot be applied to gemma2 models: its post_feedforward_layernorm"):
        load(tmp_path, recipe_text(gemma, "  scales: [0.5, 2.0]\n"))
    assert load(tmp_path, recipe_text(gemma, "")) is not None  # a path without W is fine
    neox = make_family(tmp_path / "neox", "gpt_neox", variants=1)
    with pytest.raises(RecipeError, match="does not know which tensor of a gpt_neox layer"):
        load(tmp_path, recipe_text(neox, "  scales: [0.5, 2.0]\n"))


def block(slots=8, lo=None, hi=None):
    return Routing(models=["a"], num_layers={"a": slots}, min_layers=lo, max_layers=hi)


def test_paper_decoding_and_length_repair():
    indicator = [0.5, -0.1, 0.0, 0.9, -0.8, 0.2, 0.3, -0.05]
    assert open_slots(block(), indicator) == [0, 3, 5, 6]  # I > 0, strictly
    # too long for max 4 (2 forced + 2): keep the two largest values, in slot order
    assert open_slots(block(hi=4), indicator) == [0, 3]
    # too short for min 8 (2 forced + 6): also open the closed slots with the largest values
    assert open_slots(block(lo=8), indicator) == [0, 2, 3, 5, 6, 7]


@pytest.fixture
def wide_model(tmp_path):
    """A config-only llama with hidden size 48 (the tiny family has 32)."""
    folder = tmp_path / "wide"
    transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=43).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "extra, line, message",
    [
        ("  repeats: 0\n", 4, "repeats (r) must be at least 1, got 0"),
        ("  scales: [0.0, 2.0]\n", 4, "must be positive"),
        ("  scales: [-1.0, 2.0]\n", 4, "must be positive"),
        ("  scales: [2.0, 1.0]\n", 4, "is empty"),
        ("  repeats: 2\n  min_layers: 19\n", 5,
         "min_layers 19 can never be reached: 16 slots (8 layers x 2 repeats) "
         "plus the 2 forced layers make at most 18"),
        ("  max_layers: 1\n", 4, "below 2: the first and last layers"),
        ("  min_layers: 6\n  max_layers: 5\n", 4, "min_layers 6 is above routing.max_layers 5"),
        ("  colour: red\n", 4, "routing.colour: Extra inputs are not permitted"),
    ],
)
def test_bad_routing_block_names_the_line(tiny_llama, tmp_path, extra, line, message):
    _, v1, v2 = tiny_llama
    with pytest.raises(RecipeError) as e:
        load(tmp_path, recipe_text([v1, v2], extra))
    assert e.value.line == line
    assert message in e.value.message


def test_different_hidden_sizes_rejected(tiny_llama, wide_model, tmp_path):
    _, v1, _ = tiny_llama
    text = ("merge_method: passthrough\nrouting:\n  models:\n    - " + str(v1) + "\n    - " + str(wide_model) + "\n"
            + EVOLVE)
    with pytest.raises(RecipeError) as e:
        load(tmp_path, text)
    assert e.value.line == 5
    assert "must share hidden_size" in e.value.message and "48" in e.value.message


def test_routing_needs_passthrough_and_no_models(tiny_llama, tmp_path):
    _, v1, v2 = tiny_llama
    with pytest.raises(RecipeError) as e:
        load(tmp_path, recipe_text([v1, v2], method="linear"))
    assert e.value.line == 1 and "needs merge_method: passthrough" in e.value.message
    with pytest.raises(RecipeError) as e:
        load(tmp_path, recipe_text([v1, v2]) + f"models:\n  - model: {v1}\n")
    assert e.value.line == 7 and "'models' cannot be used with 'routing:'" in e.value.message


def test_layer_counts_without_config(tiny_llama, tmp_path):
    _, v1, _ = tiny_llama
    with pytest.raises(RecipeError) as e:
        load(tmp_path, recipe_text([v1, "nobody/not-downloaded-7b"]))
    assert e.value.line == 3 and "no config.json for routed model 'nobody/not-downloaded-7b'" in e.value.message
    # a dry run on Hub ids: the counts come from the recipe
    recipe = load(tmp_path, recipe_text([v1, "nobody/not-downloaded-7b"],
                                        "  num_layers: {nobody/not-downloaded-7b: 6}\n"))
    assert len(indicator_names(recipe)) == 4 + 6
    # ... and must agree with a config that is there
    with pytest.raises(RecipeError) as e:
        load(tmp_path, recipe_text([v1], f"  num_layers: {{{v1}: 5}}\n"))
    assert e.value.line == 4 and "gives" in e.value.message and "config.json has 4" in e.value.message
