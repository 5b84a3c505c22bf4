"""The generated model card: Hub front matter that huggingface_hub parses back, and a body built from the run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_evolve.publish.card import write_card
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.report.winner import plot_history

OBJECTIVE = "tiny_copy/acc,none"
RECIPE = """\
merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/v1
    parameters:
      weight: {search: [0.0, 1.0]}
  - model: models/v2
    parameters:
      weight: {search: [0.0, 1.0]}
dtype: float32
evolve:
  allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
  sampler: tpe
  trials: 3
  objectives:
    - {task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}
publish:
  license: apache-2.0
"""


def _entry(search: float, heldout: float, objective: str = OBJECTIVE) -> dict:
    return {"search": search, "heldout": heldout,
            "per_objective": {"search": {objective: search}, "heldout": {objective: heldout}}}


def build_run(run_dir: Path, models: list[Path], recipe: str = RECIPE, weights: tuple[float, float] = (0.4, 0.7),
              winner_trial: int = 1, objective: str = OBJECTIVE) -> Path:
    """A finished run folder as the pipeline leaves it: best/ (a real mergekit merge, the card), report.json, the plot.

    Scores are made up (not measured), so tests check that they flow through, never their values.
    """
    base, v1, v2 = models
    point = {"v1.weight": weights[0], "v2.weight": weights[1]}
    config = MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(v1), "parameters": {"weight": weights[0]}},
                   {"model": str(v2), "parameters": {"weight": weights[1]}}],
    })
    run_merge(config, str(run_dir / "best"),
              options=MergeOptions(copy_tokenizer=True, write_model_card=True, quiet=True))
    (run_dir / "best" / "recipe.yml").write_text(recipe)
    (run_dir / "recipe.yml").write_text(recipe)
    study = optuna.create_study(direction="maximize", study_name="tiny")
    for value in (0.25, 0.5, 0.375):
        study.add_trial(optuna.trial.create_trial(value=value))
    plot_history(run_dir, study)
    report = {
        "objective": f"1*{objective}",
        "winner": {**_entry(0.5, 0.4375, objective), "trial": winner_trial, "point": point},
        "sources": {str(base): _entry(0.125, 0.1875, objective), str(v1): _entry(0.25, 0.3125, objective),
                    str(v2): _entry(0.3125, 0.25, objective)},
        "trials": 3,
        "study": "tiny",
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    write_card(run_dir)  # the pipeline's last step
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("card") / "run", tiny_llama)


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card starts with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", text, re.S)


def test_card_front_matter_parses_back_with_huggingface_hub(run_dir):
    card_path = write_card(run_dir)
    text = card_path.read_text()
    meta = _front_matter(text)
    assert meta == metadata_load(card_path)
    report = json.loads((run_dir / "report.json").read_text())

    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"  # from the recipe's publish section
    assert {"merge", "mergekit", "mergekit-evolve", "task_arithmetic", "tpe"} <= set(meta["tags"])
    # every source is a local folder: named in the text instead, and a merge relation to nothing is left out
    assert "base_model" not in meta and "base_model_relation" not in meta
    # huggingface_hub's own parsers accept the model-index; it holds the held-out score only (the search
    # score is the best of many trials on the same examples)
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny"
    got = {(r.dataset_type, r.dataset_name, r.metric_type, r.metric_name): r.metric_value for r in results}
    per = report["winner"]["per_objective"]
    assert got == {("tiny_copy_heldout", "tiny_copy_heldout (held-out)", "acc", "accuracy"): per["heldout"][OBJECTIVE]}
    card = ModelCard.load(card_path)
    assert card.data.model_name == "tiny" and len(card.data.eval_results) == 1
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()


def test_card_body_tells_how_the_winner_was_made(run_dir):
    text = write_card(run_dir).read_text()
    report = json.loads((run_dir / "report.json").read_text())
    # winner vs every source, on both splits
    rows = {line.split("|")[1].strip(): [float(c) for c in line.strip().strip("|").split("|")[1:]]
            for line in text.splitlines() if re.match(r"\| (\*\*this merge\*\*|base|v1|v2) \|", line)}
    assert rows["**this merge**"] == [report["winner"]["search"], report["winner"]["heldout"]]
    for source, entry in report["sources"].items():
        assert rows[Path(source).name] == [entry["search"], entry["heldout"]]
    # the concrete config (sources by name, with a note) and the recipe
    blocks = _code_blocks(text, "yaml")
    config = (run_dir / "best" / "mergekit_config.yml").read_text()
    for source in report["sources"]:
        config = config.replace(source, Path(source).name)
    assert any(b.startswith("# Not on the Hub: base, v1, v2") and b.endswith(config.strip()) for b in blocks)
    assert (run_dir / "best" / "recipe.yml").read_text().strip() in blocks
    # the history plot sits beside the card and is embedded by relative path
    assert (run_dir / "best" / "history.png").read_bytes() == (run_dir / "plots" / "history.png").read_bytes()
    assert re.search(r"!\[[^\]]*\]\(history\.png\)", text)
    # local sources are named in the text; the usage snippet loads this folder as plain text (no chat template)
    for source in report["sources"]:
        assert f"local folder `{Path(source).name}`" in text and source not in text
    assert "A `task_arithmetic` merge of 2 models onto base" in text  # the base is not counted as merged
    usage = _code_blocks(text, "python")[0]
    assert f'model="{run_dir / "best"}"' in usage and "messages" not in usage
    assert "## Lineage" not in text
    assert "## Limitations" in text and "`tiny_copy_heldout`" in text.split("## Limitations")[1]


def test_card_names_hub_sources_in_base_model_and_shows_chat_usage(tmp_path, tiny_llama):
    """Hub ids go to base_model, a local folder only to the text; a chat template gives a chat snippet."""
    run_dir = build_run(tmp_path / "run", tiny_llama)
    best = run_dir / "best"
    hub_ids = {str(tiny_llama[1]): "org-a/expert-one", str(tiny_llama[2]): "org-b/expert-two"}
    for path in (best / "mergekit_config.yml", run_dir / "report.json"):
        text = path.read_text()
        for local, hub in hub_ids.items():
            text = text.replace(local, hub)
        path.write_text(text)
    tok_config = json.loads((best / "tokenizer_config.json").read_text())
    (best / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": "{{ messages }}"}))

    text = write_card(run_dir).read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == ["org-a/expert-one", "org-b/expert-two"]
    assert meta["base_model_relation"] == "merge"
    assert str(tiny_llama[0]) not in text
    assert "local folder `base`" in text
    assert "[org-a/expert-one](https://huggingface.co/org-a/expert-one)" in text
    assert "messages = [" in _code_blocks(text, "python")[0]


def test_card_of_a_later_stage_shows_its_lineage(tmp_path, tiny_llama):
    """A stage that merged an earlier stage's winner lists that winner, its scores and its own sources."""
    staged = tmp_path / "staged"
    ps = build_run(staged / "ps", tiny_llama, winner_trial=7)
    dfs = build_run(staged / "dfs", [tiny_llama[0], ps / "best", tiny_llama[2]])
    body = yaml.safe_load(RECIPE)
    staged_recipe = {"stages": [{"name": "ps", **body, "publish": {}}, {"name": "dfs", **body}]}
    (dfs / "best" / "recipe.yml").write_text(yaml.safe_dump(staged_recipe, sort_keys=False))

    text = write_card(dfs).read_text()
    assert "stage `dfs` of a staged recipe" in text
    lineage = text.split("## Lineage")[1].split("\n## ")[0]
    assert ("ps/best: a `task_arithmetic` merge found by mergekit-evolve (trial 7, search 0.5000, held-out 0.4375)"
            in lineage)
    assert "local folder `v1`" in lineage  # the earlier stage's own sources
    assert _front_matter(text)["license"] == "apache-2.0"  # the stage's body of the staged recipe is read


def test_card_refuses_an_unfinished_or_staged_top_folder(tmp_path, tiny_llama):
    run_dir = build_run(tmp_path / "top" / "ps", tiny_llama)
    with pytest.raises(PublishError, match="staged run; give one stage's folder: .*top/ps"):
        write_card(tmp_path / "top")
    (run_dir / "report.json").unlink()
    with pytest.raises(PublishError, match=r"report\.json: No such file"):
        write_card(run_dir)
    shutil.rmtree(run_dir / "best")
    with pytest.raises(PublishError, match="holds no merged model: run the search first"):
        write_card(run_dir)


def test_card_embeds_the_pareto_plot_of_a_multi_objective_run(tmp_path, tiny_llama):
    run_dir = build_run(tmp_path / "run", tiny_llama)
    assert "pareto.png" not in write_card(run_dir).read_text()
    # stands in for write_pareto's plot
    shutil.copyfile(run_dir / "plots" / "history.png", run_dir / "plots" / "pareto.png")
    text = write_card(run_dir).read_text()
    assert re.search(r"!\[Pareto front[^\]]*\]\(pareto\.png\)", text)
    assert (run_dir / "best" / "pareto.png").read_bytes() == (run_dir / "plots" / "pareto.png").read_bytes()


def test_card_of_a_plugin_method_says_how_to_merge_it_again(tmp_path, tiny_llama):
    from mergekit_evolve.methods.registry import register_plugins

    method = register_plugins()[0]  # one of the merge methods this package adds to mergekit
    run_dir = build_run(tmp_path / "run", tiny_llama)
    config = run_dir / "best" / "mergekit_config.yml"
    config.write_text(config.read_text().replace("merge_method: task_arithmetic", f"merge_method: {method}"))
    text = write_card(run_dir).read_text()
    assert f"`mergekit-evolve merge mergekit_config.yml OUT` (`{method}` is a merge method" in text
    assert method in _front_matter(text)["tags"]


def test_card_names_local_folders_by_their_hub_id_and_takes_the_dataset_from_the_task_config(tmp_path, tiny_llama):
    """publish.hub_ids (relative to the recipe) or the Hugging Face cache layout give a local folder its Hub id;
    the model-index names the dataset, subset and split the held-out task's own YAML names."""
    recipe_dir = tmp_path / "project"
    (recipe_dir / "tasks").mkdir(parents=True)
    for name, split in (("tiny_copy", "validation"), ("tiny_copy_heldout", "test")):
        (recipe_dir / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "org-d/copy-set", "dataset_name": "chars", f"{split}_split": split,
            "output_type": "loglikelihood", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}], "num_fewshot": 2,
        }))
    models = recipe_dir / "models"
    base = shutil.copytree(tiny_llama[0], models / "base")
    v1 = shutil.copytree(tiny_llama[1], tmp_path / "hub" / "models--org-a--expert-one" / "snapshots" / "abc123")
    v2 = shutil.copytree(tiny_llama[2], models / "v2")
    recipe = RECIPE.replace("publish:\n", "  task_paths: [tasks]\npublish:\n  hub_ids: {models/v2: org-b/expert-two}\n")
    run_dir = build_run(recipe_dir / "runs" / "tiny", [base, v1, v2], recipe=recipe)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": "x", "recipe": str(recipe_dir / "recipe.yml")}))

    text = write_card(run_dir).read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == ["org-a/expert-one", "org-b/expert-two"]
    assert "local folder `models/base`" in text and str(tmp_path) not in text.split("## Usage")[0]
    (result,) = ModelCard.load(run_dir / "best" / "README.md").data.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("org-d/copy-set", "chars", "test")
    assert "[org-d/copy-set](https://huggingface.co/datasets/org-d/copy-set) `chars` `validation` | 2 |" in text


def test_card_inherits_the_license_the_sources_share(tmp_path, tiny_llama):
    models = [shutil.copytree(m, tmp_path / "models" / m.name) for m in tiny_llama]
    for m in models:
        (m / "README.md").write_text("---\nlicense: mit\n---\n# a source\n")
    run_dir = build_run(tmp_path / "run", models, recipe=RECIPE.replace("  license: apache-2.0\n", "  {}\n"))
    assert _front_matter(write_card(run_dir).read_text())["license"] == "mit"
    (models[1] / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert "license" not in _front_matter(write_card(run_dir).read_text())  # they disagree: publish asks for one


@pytest.mark.parametrize(("objective", "name", "says"), [
    ("{python: fitness.py:score, data: prompts.jsonl, heldout_data: heldout.jsonl}", "score",
     "scored by the recipe's function `fitness.py:score`"),
    ("{reward_model: rm, prompts: prompts.jsonl}", "reward:rm", "greedy answers scored by the reward model `rm`"),
    ("{judge_model: judge, prompts: prompts.jsonl}", "judge:judge", "rated by the judge model `judge`"),
    ("{judge_model: judge, prompts: prompts.jsonl, scoring: parse}", "judge:judge",
     "rated by the judge model `judge` with the recipe's rubric, the rating read from its reply"),
    ("{judge_model: judge, prompts: prompts.jsonl, mode: pairwise, reference: v1}", "judge:judge",
     "greedy answers compared with `v1`'s by the judge model `judge` in both orders"),
])
def test_card_names_objectives_that_are_not_tasks_by_their_files(tiny_llama, tmp_path, objective, name, says):
    recipe = RECIPE.replace('{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}', objective)
    text = (build_run(tmp_path / "run", tiny_llama, recipe, objective=name) / "best" / "README.md").read_text()
    assert (says in text and f"{name} on `prompts.jsonl`" in text
            and "lm-eval" not in text.split("## Evaluation")[-1][:200])
    assert ("heldout.jsonl" in text) == ("heldout" in objective)
