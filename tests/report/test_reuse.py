"""The report phase reuses every score already computed: the winner's search score, and the sources'
scores across the stages of a staged run (examples actually run through the model are counted)."""

import json
import textwrap

import pytest
from click.testing import CliRunner
from mergekit.options import MergeOptions
from tiny_models import write_copy_task

import mergekit_evolve.pipeline as pipeline
from mergekit_evolve.cli import cli
from mergekit_evolve.recipe.compile import config_digest
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.study.worker import Worker


def two_stages(tmp_path, tiny_llama):
    """Two searches over the same three sources (the second does not merge the first's winner)."""
    base, v1, v2 = tiny_llama
    body = textwrap.indent(textwrap.dedent(f"""
        base_model: {base}
        models:
          - model: {v1}
            parameters: {{weight: {{search: [0.0, 1.0]}}}}
          - model: {v2}
            parameters: {{weight: {{search: [0.0, 1.0]}}}}
        dtype: float32"""), " " * 12)
    text = textwrap.dedent(f"""
        stages:
          - name: first
            merge_method: task_arithmetic{body}
            evolve: &evolve
              sampler: random
              trials: 2
              seed: 1
              pruning: {{pruner: none}}
              objectives: [{{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}]
              task_paths: [tasks]
              allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          - name: second
            merge_method: task_arithmetic{body}
            evolve:
              <<: *evolve
              seed: 2
        """).lstrip()
    path = tmp_path / "staged.yml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_report_phase_computes_nothing_already_scored(tiny_llama, tmp_path, monkeypatch):
    write_copy_task(tmp_path, n_search=8, n_heldout=8)
    path = two_stages(tmp_path, tiny_llama)
    # each score_config in a report phase: stage, config, split, examples run
    calls: list[tuple[str, str, str, int]] = []
    winners: dict[str, str] = {}  # stage -> the winner's config digest
    stage = {"name": None}
    score_config, write_report = Worker.score_config, pipeline.write_report

    def counting_score_config(self, config, split):
        before = self.evaluator.computed
        scores = score_config(self, config, split)
        if stage["name"]:
            what = "winner" if config_digest(config) == winners[stage["name"]] else "other"
            calls.append((stage["name"], what, split, self.evaluator.computed - before))
        return scores

    def report_phase(run_dir, study, worker, best):
        stage["name"], winners[run_dir.name] = run_dir.name, best.user_attrs["config_digest"]
        try:
            return write_report(run_dir, study, worker, best)
        finally:
            stage["name"] = None

    monkeypatch.setattr(Worker, "score_config", counting_score_config)
    monkeypatch.setattr(pipeline, "write_report", report_phase)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, [str(path), "-o", str(runs), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    # the winner's search score is its trial's (not merged or scored again); its held-out split is new.
    # The first stage scores the three sources on both splits (8 examples each); the second reuses them.
    winner_heldout = [("first", "winner", "heldout", 8), ("second", "winner", "heldout", 8)]
    assert [c for c in calls if c[1] == "winner"] == winner_heldout
    assert ([c for c in calls if c[1] == "other"]
            == [("first", "other", split, 8) for _ in range(3) for split in ("search", "heldout")])
    reports = {s: json.loads((runs / s / "report.json").read_text()) for s in ("first", "second")}
    assert reports["second"]["sources"] == reports["first"]["sources"]
    trial = reports["first"]["winner"]["trial"]
    stored = [json.loads(x) for x in (runs / "first" / "trials.jsonl").read_text().splitlines()][trial]
    assert reports["first"]["winner"]["search"] == pytest.approx(stored["value"])


def test_anchors_are_chosen_from_the_sources_results_the_run_already_has(tiny_llama, tmp_path):
    """The run's check that the sources' scores vary scores them on the search split; choosing anchors
    reads those per-example results again instead of scoring the sources once more."""
    write_copy_task(tmp_path, n_search=8, n_heldout=4)
    base, v1, v2 = tiny_llama
    path = tmp_path / "r.yml"
    path.write_text(textwrap.dedent(f"""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - {{model: {v1}, parameters: {{weight: {{search: [0.0, 1.0]}}}}}}
          - {{model: {v2}, parameters: {{weight: {{search: [0.0, 1.0]}}}}}}
        dtype: float32
        evolve:
          sampler: random
          objectives: [{{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout, anchors: 4}}]
          task_paths: [tasks]
        """).lstrip())
    recipe = load_recipe(path)
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    dtype = recipe.compile(recipe.search_space.default_point()).dtype
    for model in worker.sources:
        worker.source_scores(model, "search", dtype)
    assert worker.evaluator.computed == 3 * 8
    worker.anchor_sets()
    assert worker.evaluator.computed == 3 * 8
