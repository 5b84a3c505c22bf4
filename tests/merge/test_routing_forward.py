"""A routed merge computes what running the chosen source layers in sequence, scales applied, computes."""

import random

import pytest
import torch
import transformers
from mergekit.options import MergeOptions

from mergekit_evolve.merge.engine import InMemoryMerger
from mergekit_evolve.recipe.document import load_recipe


def write_recipe(tmp_path, models, repeats=2):
    path = tmp_path / "dfs.yml"
    path.write_text(
        "merge_method: passthrough\n"
        "routing:\n"
        f"  models: [{', '.join(str(m) for m in models)}]\n"
        f"  repeats: {repeats}\n"
        "  scales: [0.25, 4.0]\n"
        "dtype: float32\n"
        "evolve:\n  objectives: [{task: unused}]\n"
    )
    return load_recipe(path)


def by_hand(models, path, scales, ids, embed_scale=1.0):
    """Embed with A (times ``embed_scale``), run each (model, layer) of ``path`` from the HF modules, A's norm and head.

    ``scales[k]`` multiplies the MLP output of hop k before it joins the residual stream.
    """
    a = models[0]
    n = ids.shape[1]
    h = embed_scale * a.model.embed_tokens(ids)
    rope = a.model.rotary_emb(h, torch.arange(n)[None])
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    for (m, layer), scale in zip(path, scales, strict=False):
        block = models[m].model.layers[layer]
        attn, _ = block.self_attn(hidden_states=block.input_layernorm(h), position_embeddings=rope, attention_mask=mask)
        h = h + attn
        h = h + scale * block.mlp(block.post_attention_layernorm(h))
    return a.lm_head(a.model.norm(h))


@pytest.mark.parametrize("arch, seed", [("llama", 0), ("llama", 1), ("mistral", 0), ("qwen2", 0), ("qwen3", 0),
                                        ("phi3", 0)])
def test_routed_merge_equals_layers_run_by_hand(tiny_llama, tmp_path, arch, seed):
    from tiny_models import make_family

    base, v1, v2 = tiny_llama if arch == "llama" else make_family(tmp_path / arch, arch)
    recipe = write_recipe(tmp_path, [v1, v2, base])
    layers = 4
    M, T = 3 * layers, 3 * layers * 2

    rng = random.Random(seed)
    indicator = [rng.uniform(-1, 1) for _ in range(T)]
    W = [[rng.uniform(0.25, 4.0) for _ in range(M)] for _ in range(M)]  # the paper's W, by layout layer
    names = [n for n in recipe.search_space.dimensions if n.startswith("routing.r") and not n.endswith(".scale")]
    assert len(names) == T and len(recipe.search_space) == T + M * M + 1  # + the hop from the embedding
    point = {n: v for n, v in zip(names, indicator, strict=False)}
    labels = [f"{m}.L{layer}" for m in ("v1", "v2", "base") for layer in range(layers)]
    point |= {f"routing.W.{labels[i]}.{labels[j]}": W[i][j] for i in range(M) for j in range(M)}
    point["routing.W.embed.v1.L0"] = embed = rng.uniform(0.25, 4.0)

    # the paper's decoding, by hand: slot i is used when I[i] > 0; the layer is i mod M
    used = [i for i in range(T) if indicator[i] > 0]
    path = [(0, 0)] + [((i % M) // layers, (i % M) % layers) for i in used] + [(0, layers - 1)]
    flat = [m * layers + layer for m, layer in path]  # rows and columns of W
    hop_scales = [1.0] + [W[flat[k - 1]][flat[k]] for k in range(1, len(path))]  # hop k's scale ...
    mlp_scales = hop_scales[1:] + [1.0]  # ... multiplies hop k-1's MLP output

    config = recipe.compile(point)
    assert len(config.slices) == len(path)
    merged = InMemoryMerger(MergeOptions(quiet=True)).materialize(config)
    sources = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (v1, v2, base)]

    ids = torch.tensor([[2, 5, 9, 13, 17, 21, 30, 33, 7]])
    with torch.no_grad():
        got = merged(ids).logits
        want = by_hand(sources, path, mlp_scales, ids, embed)
        unscaled = by_hand(sources, path, [1.0] * len(path), ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, unscaled, atol=1e-3), "the scales changed nothing: the check would be vacuous"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2"])
def test_paths_longer_and_shorter_than_the_source_work_for_layer_types_families(tmp_path, arch):
    """Qwen 2/3 and Gemma 2 list a type per layer: a routed merge rebuilds that list, in memory
    and in a written model folder (what best/, merge --trial and export write), which loads and
    computes what the in-memory candidate computed."""
    from mergekit.merge import run_merge
    from tiny_models import make_family

    from mergekit_evolve.merge.layer_types import layer_types_fixed

    base, v1 = make_family(tmp_path / arch, arch, variants=1)
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: passthrough\nrouting:\n  models: [{base}, {v1}]\n  repeats: 1\n"
                    "dtype: float32\nevolve:\n  objectives: [{task: unused}]\n")
    recipe = load_recipe(path)
    names = [n for n in recipe.search_space.dimensions if n.startswith("routing.r")]
    source_types = transformers.AutoConfig.from_pretrained(base).layer_types
    ids = torch.tensor([[2, 5, 9, 13, 17, 21, 30, 33, 7]])
    merger = InMemoryMerger(MergeOptions(quiet=True))
    for opened, layers in (([1, 2, 5, 6], [0, 1, 2, 1, 2, 3]), ([2], [0, 2, 3])):  # slots 5, 6 = v1's L1, L2
        config = recipe.compile({n: (0.5 if i in opened else -0.5) for i, n in enumerate(names)})
        assert len(config.slices) == len(layers) != 4
        with torch.no_grad():
            want = merger.materialize(config)(ids).logits.clone()
        assert merger.materialize(config).config.layer_types == [source_types[i] for i in layers]
        out = tmp_path / f"out{len(layers)}"
        with layer_types_fixed():
            run_merge(config.model_copy(deep=True), str(out), options=MergeOptions(quiet=True))
        written = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert written.config.num_hidden_layers == len(layers) == len(written.config.layer_types)
        with torch.no_grad():
            assert torch.allclose(written(ids).logits, want, atol=1e-5)


def test_gpt2_routed_merge_scales_the_mlp_output_with_its_bias(tmp_path):
    """GPT-2's MLP output projection has a bias: the scale filter (mlp.c_proj) takes weight and bias."""
    from tiny_models import make_family

    base, v1 = make_family(tmp_path / "gpt2", "gpt2", variants=1)
    recipe = write_recipe(tmp_path, [base, v1], repeats=1)
    names = [n for n in recipe.search_space.dimensions if n.startswith("routing.r")]
    point = {n: (0.5 if i in (1, 5, 2) else -0.5) for i, n in enumerate(names)}  # base L0, L1, L2, v1 L1, base L3
    labels = [f"{m}.L{layer}" for m in ("base", "v1") for layer in range(4)]
    W = {(i, j): 1.0 + 0.1 * i + 0.05 * j for i in range(8) for j in range(8)}
    point |= {f"routing.W.{labels[i]}.{labels[j]}": w for (i, j), w in W.items()}
    point["routing.W.embed.base.L0"] = 1.3  # the token and the position embeddings: their sum, scaled
    path = [(0, 0), (0, 1), (0, 2), (1, 1), (0, 3)]
    flat = [m * 4 + layer for m, layer in path]
    mlp_scales = [W[(flat[k], flat[k + 1])] for k in range(4)] + [1.0]
    merged = InMemoryMerger(MergeOptions(quiet=True)).materialize(recipe.compile(point))
    models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (base, v1)]
    ids = torch.tensor([[2, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        a = models[0].transformer
        h = 1.3 * (a.wte(ids) + a.wpe(torch.arange(ids.shape[1])[None]))
        for (m, layer), scale in zip(path, mlp_scales, strict=False):
            block = models[m].transformer.h[layer]
            h = h + block.attn(block.ln_1(h))[0]
            h = h + scale * block.mlp(block.ln_2(h))
        want = models[0].lm_head(a.ln_f(h))
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)
