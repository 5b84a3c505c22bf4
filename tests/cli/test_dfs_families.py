"""A DFS search from the command line on the families whose config lists ``layer_types`` (Qwen 2/3,
Gemma 2 in transformers 5): every path is longer (or shorter) than the sources, the winner is
written to a loadable ``best/``, and ``merge --trial`` writes the same model again."""

import json

import pytest
import safetensors.torch
import torch
import transformers
from click.testing import CliRunner
from tiny_models import make_family

from mergekit_evolve.cli import cli

# fitness: the mean log-likelihood of a few strings (any score that depends on the path will do)
FITNESS = """\
def score(model, tokenizer, examples):
    out = []
    for e in examples:
        ids = tokenizer(e["text"], return_tensors="pt")["input_ids"]
        out.append(-float(model(input_ids=ids, labels=ids).loss))
    return out
"""


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [(6, 8), (2, 3)], ids=["longer", "shorter"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2"])
def test_a_dfs_search_writes_a_winner_of_another_length_that_loads(tmp_path, arch, lengths):
    base, v1 = make_family(tmp_path / arch, arch, variants=1)
    (tmp_path / "fitness.py").write_text(FITNESS)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abcab", "cabbac", "bca")))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"""\
merge_method: passthrough
routing:
  models: [{base}, {v1}]
  repeats: 1
  min_layers: {lengths[0]}          # the sources have 4 layers: every path is longer, or shorter
  max_layers: {lengths[1]}
dtype: float32
evolve:
  sampler: random
  trials: 3
  seed: 1
  device: cpu
  threads: 1
  pruning: {{pruner: none}}
  objectives: [{{python: fitness.py:score, data: data.jsonl}}]
""")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (run_dir / "best.partial").exists()
    best = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "best", dtype=torch.float32).eval()
    layers = best.config.num_hidden_layers
    assert lengths[0] <= layers <= lengths[1] and len(best.config.layer_types) == layers
    ids = torch.tensor([[3, 4, 5, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(best(ids).logits).all()

    report = json.loads((run_dir / "report.json").read_text())
    trial = report["winner"]["trial"]
    again = tmp_path / "again"
    result = CliRunner().invoke(cli, ["merge", "--trial", str(trial), "--run", str(run_dir), str(again)])
    assert result.exit_code == 0, result.output
    ours = safetensors.torch.load_file(run_dir / "best" / "model.safetensors")
    theirs = safetensors.torch.load_file(again / "model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
