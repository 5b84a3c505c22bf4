"""Every shipped recipe validates and compiles with --dry-run, without weights or network."""

from pathlib import Path

import lm_eval
import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolve.cli import cli
from mergekit_evolve.recipe.document import load_document, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_run(path, tmp_path):
    result = CliRunner().invoke(cli, [str(path), "--dry-run", "-o", str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "# one compiled config" in result.output
    assert not (tmp_path / "runs").exists()


def builtin_lm_eval_tasks() -> set[str]:
    names = set()
    for file in (Path(lm_eval.__file__).parent / "tasks" / "mgsm").rglob("*.yaml"):
        task = yaml.safe_load(file.read_text(encoding="utf-8").replace("!function", "")).get("task")
        names.add(task)
    return names


def test_paper_recipes_keep_the_paper_settings(tmp_path):
    ps = load_recipe(REPO / "recipes" / "evollm-jp-ps.yml")
    dfs = load_recipe(REPO / "recipes" / "evollm-jp-dfs.yml")
    staged_ps, staged_dfs = (s.recipe
                             for s in load_document(REPO / "recipes" / "evollm-jp-ps-dfs.yml").stages(tmp_path))
    sources = {"augmxnt/shisa-gamma-7b-v1", "WizardLM/WizardMath-7B-V1.1", "GAIR/Abel-7B-002"}
    for recipe in (ps, staged_ps):
        assert (recipe.template["merge_method"] == "dare_ties"
                and recipe.template["base_model"] == "mistralai/Mistral-7B-v0.1")
        assert {m["model"] for m in recipe.template["models"]} == sources
        assert (len(recipe.search_space) == 6
                and all((d.low, d.high) == (0.0, 1.0) for d in recipe.search_space.dimensions.values()))
        assert recipe.template["parameters"]["normalize"] is False
        assert (recipe.evolve.sampler, recipe.evolve.trials) == ("cmaes", 1000)
    for recipe in (dfs, staged_dfs):
        block = recipe.template["routing"]
        assert block["repeats"] == 3 and len(block["models"]) == 2 and block["models"][1] == "augmxnt/shisa-gamma-7b-v1"
        # T = M x r = 192 indicators, the paper's W (M x M) and the hop from the embedding
        assert len(recipe.search_space) == 64 * 3 + 64 * 64 + 1
        assert block["max_layers"] >= 65  # the paper's own model has 65 hops
        assert (recipe.evolve.sampler, recipe.evolve.sampler_options.given(), recipe.evolve.trials) == (
            "cma", {"popsize": 128, "sigma0": 0.05}, 12800)
        assert recipe.evolve.objectives[0].limit == 200
    assert staged_dfs.template["routing"]["models"][0] == str((tmp_path / "ps" / "best").resolve())
    known = builtin_lm_eval_tasks()
    for recipe in (ps, dfs, staged_ps, staged_dfs):
        assert {o.task for o in recipe.evolve.objectives} <= known
