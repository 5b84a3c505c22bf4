"""The recipe's ``publish:`` section: parsed with line-numbered errors, and checked before a search starts."""

from __future__ import annotations

import textwrap

import pytest
from huggingface_hub import constants

from mergekit_evolve.pipeline import RunFailed, RunOptions, run_recipe
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError


def write_recipe(folder, tiny_llama, publish: str) -> object:
    base, v1, v2 = tiny_llama
    path = folder / "r.yml"
    path.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {v1}
            parameters: {{weight: {{search: [0.0, 1.0]}}}}
          - model: {v2}
            parameters: {{weight: 0.5}}
        evolve:
          objectives: [{{task: tiny_copy}}]
        """) + publish)
    return path


def test_publish_section_is_parsed(tmp_path, tiny_llama):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama,
                                      "publish:\n  repo: me/m\n  space: me/m-demo\n  private: true\n  license: mit\n"))
    assert ((recipe.publish.repo, recipe.publish.space, recipe.publish.private, recipe.publish.license)
            == ("me/m", "me/m-demo", True, "mit"))
    assert "publish" not in recipe.template  # not part of the mergekit config
    assert load_recipe(write_recipe(tmp_path, tiny_llama, "")).publish is None


@pytest.mark.parametrize("section, line, message", [
    ("publish:\n  repo: no-namespace\n", 11, "publish.repo: Value error, 'no-namespace' is not of the form owner/name"),
    ("publish:\n  repo: me/m\n  spaec: me/d\n", 12, "publish.spaec: Extra inputs are not permitted"),
    ("publish:\n  space: me/d\n", 10, "publish: Value error, 'space' needs 'repo'"),
    ("publish:\n  repo: me/m\n  private: maybe\n", 12, "publish.private: Input should be a valid boolean"),
])
def test_publish_section_errors_name_the_line(tmp_path, tiny_llama, section, line, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, tiny_llama, section))
    assert e.value.line == line and message in str(e.value)


def test_a_run_that_must_publish_checks_the_token_before_searching(tmp_path, tiny_llama, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, "publish:\n  repo: me/m\n"))
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailed, match="HF_HUB_OFFLINE is set"):  # the tests' offline mode
        run_recipe(recipe, run_dir, RunOptions(show_progress=False))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RunFailed, match="no Hugging Face token"):
        run_recipe(recipe, run_dir, RunOptions(show_progress=False))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    # the tiny models' folders have no card, so no license to inherit: asked for now, not after the search
    with pytest.raises(RunFailed, match=r"no license for the model card \(the sources' cards say .*no license found"):
        run_recipe(recipe, run_dir, RunOptions(show_progress=False))
    assert not run_dir.exists()  # refused before the run folder was made
