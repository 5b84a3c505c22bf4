"""Staged recipes: stage references, validation before any search, PS then DFS end to end."""

import json
import textwrap

import pytest
from click.testing import CliRunner
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.recipe.document import load_document
from mergekit_evolve.recipe.yaml_lines import RecipeError


def staged(tmp_path, tiny_llama, *, ps_trials=2, dfs_trials=2):
    base, v1, v2 = tiny_llama
    text = textwrap.dedent(f"""
        stages:
          - name: ps
            merge_method: task_arithmetic
            base_model: {base}
            models:
              - model: {v1}
                parameters: {{weight: {{search: [0.0, 1.0]}}}}
              - model: {v2}
                parameters: {{weight: {{search: [0.0, 1.0]}}}}
            dtype: float32
            evolve: &evolve
              sampler: random
              trials: {ps_trials}
              seed: 1
              objectives: [{{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}]
              task_paths: [tasks]
              allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          - name: dfs
            merge_method: passthrough
            routing:
              models: [stage:ps, {v1}]
              repeats: 2
              scales: [0.5, 2.0]
              max_layers: 8
            dtype: float32
            evolve:
              <<: *evolve
              trials: {dfs_trials}
        """).lstrip()
    path = tmp_path / "staged.yml"
    path.write_text(text)
    return path


def test_stages_parse_with_a_previewed_winner(tiny_llama, tmp_path):
    path = staged(tmp_path, tiny_llama)
    ps, dfs = load_document(path).stages(tmp_path / "runs")
    assert (ps.name, dfs.name) == ("ps", "dfs") and dfs.uses == ("ps",)
    assert ps.run_dir == tmp_path / "runs" / "ps"
    assert ps.recipe.evolve.study_name == "staged-ps" and dfs.recipe.evolve.study_name == "staged-dfs"
    # the winner does not exist yet: its layer count is previewed by the model stage ps starts from (4 layers)
    block = dfs.recipe.template["routing"]
    winner = str((tmp_path / "runs" / "ps" / "best").resolve())
    assert block["models"][0] == winner and block["num_layers"][winner] == 4
    assert len([n for n in dfs.recipe.search_space.dimensions if n.startswith("routing.r")]) == (4 + 4) * 2
    # a winner is named by its stage
    assert any(n.startswith("routing.r0.ps.L") for n in dfs.recipe.search_space.dimensions)


def test_num_layers_can_name_a_stage(tiny_llama, tmp_path):
    path = staged(tmp_path, tiny_llama)
    path.write_text(path.read_text().replace("max_layers: 8", "max_layers: 8\n      num_layers: {stage:ps: 6}"))
    _, dfs = load_document(path).stages(tmp_path / "runs")
    assert len([n for n in dfs.recipe.search_space.dimensions if n.startswith("routing.r")]) == (6 + 4) * 2


@pytest.mark.parametrize(
    "mutate, line, message",
    [
        (lambda t: t.replace("models: [stage:ps,", "models: [stage:later,"), 21,
         "'stage:later' names no earlier stage (earlier stages: ps)"),
        (lambda t: t.replace("name: dfs", "name: ps"), 18, "two stages are named 'ps'"),
        (lambda t: t.replace("name: dfs", "name: 'a b'"), 18, "each stage needs a 'name'"),
        (lambda t: "dtype: float32\n" + t, 1, "a staged recipe has only 'stages:' at the top"),
        (lambda t: t.replace("    evolve:\n      <<: *evolve\n      trials: 2\n", ""), 18,
         "stage 'dfs' has no 'evolve:' section"),
        (lambda t: t.replace("base_model: ", "base_model: stage:ps #"), 4,
         "'stage:ps' names no earlier stage (earlier stages: none)"),
        (lambda t: t.replace("repeats: 2", "repeats: 0"), 22, "repeats (r) must be at least 1"),
    ],
)
def test_bad_staged_recipe_names_the_line(tiny_llama, tmp_path, mutate, line, message):
    path = staged(tmp_path, tiny_llama)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(RecipeError) as e:
        load_document(path).stages(tmp_path / "runs")
    assert (e.value.line, message in e.value.message) == (line, True), e.value


def test_dry_run_prints_every_stage(tiny_llama, tmp_path):
    path = staged(tmp_path, tiny_llama)
    write_copy_task(tmp_path)  # --dry-run checks the tasks too
    result = CliRunner().invoke(cli, [str(path), "--dry-run", "-o", str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "# stage 'ps'" in result.output and "# stage 'dfs'" in result.output
    assert f"model: {(tmp_path / 'runs' / 'ps' / 'best').resolve()}" in result.output
    assert not (tmp_path / "runs").exists()


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args] + ["--no-progress"], catch_exceptions=False)


@pytest.mark.slow
def test_ps_then_dfs_end_to_end(tiny_llama, tmp_path):
    write_copy_task(tmp_path)
    path = staged(tmp_path, tiny_llama)
    runs = tmp_path / "runs"
    result = run_cli(path, "-o", runs)
    assert result.exit_code == 0, result.output
    for stage in ("ps", "dfs"):
        report = json.loads((runs / stage / "report.json").read_text())
        assert report["study"] == f"staged-{stage}" and (runs / stage / "best" / "model.safetensors").exists()
        assert 0.0 <= report["winner"]["heldout"] <= 1.0
    winner = str((runs / "ps" / "best").resolve())
    dfs_trials = [json.loads(x) for x in (runs / "dfs" / "trials.jsonl").read_text().splitlines()]
    assert len(dfs_trials) == 2 and all(f"model: {winner}" in t["config"] for t in dfs_trials)
    assert "stage ps: winner" in result.output and "stage dfs: winner" in result.output

    # both finished: a second run does no search and rewrites nothing
    stamp = (runs / "dfs" / "report.json").stat().st_mtime_ns
    again = run_cli(path, "-o", runs)
    assert again.exit_code == 0, again.output
    assert (runs / "dfs" / "report.json").stat().st_mtime_ns == stamp

    # a new PS winner (here: its config edited) makes the DFS study stale: refused, then restarted on request
    config = runs / "ps" / "best" / "mergekit_config.yml"
    config.write_text(config.read_text() + "\n# changed\n")
    refused = run_cli(path, "-o", runs)
    assert refused.exit_code != 0 and "was searched with an earlier winner of stage ps" in refused.output
    restarted = run_cli(path, "-o", runs, "--overwrite")
    assert restarted.exit_code == 0, restarted.output
    assert (runs / "dfs" / "report.json").stat().st_mtime_ns != stamp
