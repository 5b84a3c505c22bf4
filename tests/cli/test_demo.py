"""The README's demo: the bundled experts merge into a winner that beats each of them on held-out data."""

import json

import pytest
from click.testing import CliRunner

from mergekit_evolve.cli import cli


@pytest.mark.slow
def test_demo_winner_beats_every_source_on_heldout(repo_root, tmp_path):
    run_dir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["run", str(repo_root / "recipes" / "demo.yml"), "-o", str(run_dir),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= {"objective", "winner", "sources"}
    assert len(report["sources"]) == 4  # base + three experts
    for name, source in report["sources"].items():
        assert report["winner"]["heldout"] > source["heldout"], (name, report)
    assert "winner" in result.output and "held-out" in result.output  # the closing table
    assert (run_dir / "best" / "model.safetensors").exists()


def test_demo_reward_model_prefers_right_answers_on_its_search_prompts(repo_root):
    """The shipped reward model learnt the rule on the search prompts: right answers outscore wrong ones there."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = repo_root / "recipes" / "demo" / "reward-model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    items = [json.loads(line) for skill in ("copy", "reverse", "sort")
             for line in (repo_root / "recipes" / "demo" / "data"
                          / f"{skill}_search.jsonl").read_text().splitlines()[:20]]

    def reward(prompt: str, answer: str) -> float:
        with torch.no_grad():
            return float(model(**tok(prompt + answer, return_tensors="pt")).logits[0, 0])

    right = sum(reward(i["prompt"], i["answer"]) for i in items) / len(items)
    cut = sum(reward(i["prompt"], i["answer"][:2]) for i in items) / len(items)  # rule: 2/5 .. 2/8 right
    assert right > cut + 0.3, (right, cut)


@pytest.mark.slow
def test_demo_reward_recipe_scores_candidates_with_the_reward_model(repo_root, tmp_path):
    run_dir = tmp_path / "demo-reward"
    recipe = repo_root / "recipes" / "demo-reward.yml"
    assert "reward_model: demo/reward-model" in recipe.read_text()
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["winner"]["per_objective"]["heldout"]) == {"copy", "reverse", "sort"}
    assert len(report["sources"]) == 4
    # the reward model ranks the sources close together; the winner is at least not below all of them
    assert report["winner"]["search"] >= min(s["search"] for s in report["sources"].values())
    assert (run_dir / "best" / "model.safetensors").exists()
