"""Multi-objective runs: one direction per objective, the Pareto front, the select rule, export by trial."""

import json

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from sampler_harness import expert_space, settings, write_recipe
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.evaluate.scores import directions, study_values
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.recipe.yaml_lines import RecipeError
from mergekit_evolve.report.pareto import select_trial, write_pareto
from mergekit_evolve.runfolder import RunFolder
from mergekit_evolve.samplers.registry import SamplerSetupError, make_sampler
from mergekit_evolve.study.records import trial_record

A, B = "a/acc,none", "b/acc,none"


def study_of(evolve, rows):
    study = optuna.create_study(directions=directions(evolve))
    for a, b in rows:
        scores = {A: a, B: b}
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=study_values(evolve, scores), user_attrs={"scores": scores},
            params={"w": a}, distributions={"w": FloatDistribution(0, 1)},
        ))
    return study


ROWS = [(0.9, 0.1), (0.5, 0.6), (0.2, 0.95), (0.4, 0.4)]  # trials 0-2 are the front; 3 is dominated by 1


def evolve(**select):
    return settings("a", "b", multi_objective=True, sampler="nsga2", select=select)


@pytest.mark.parametrize("select, chosen", [
    ({}, 2),  # weighted (1:1): 0.5, 0.55, 0.575
    ({"weighted": True}, 2),
    ({"objective": "a"}, 0),
    ({"objective": B}, 2),
    ({"at_least": {"a": 0.45}}, 1),  # among trials 0 and 1, the best weighted
    ({"objective": "b", "at_most": {"b": 0.7}}, 1),
])
def test_the_select_rule_picks_best_from_the_pareto_front(select, chosen):
    ev = evolve(**select)
    study = study_of(ev, ROWS)
    assert sorted(t.number for t in study.best_trials) == [0, 1, 2]
    assert select_trial(study, ev).number == chosen


def test_weights_and_goals_enter_the_selection(caplog):
    ev = settings("a", "b", multi_objective=True, sampler="tpe")
    ev.objectives[0].weight = 3.0  # weighted: 0.7, 0.525, 0.3875
    assert select_trial(study_of(ev, ROWS), ev).number == 0
    ev = evolve(at_least={"a": 0.95})
    assert select_trial(study_of(ev, ROWS), ev).number == 2  # nobody meets it: all of the front, with a warning
    assert "no Pareto trial meets" in caplog.text
    ev = settings("a", "b", multi_objective=True, sampler="tpe", select={"objective": "b"})
    ev.objectives[1].goal = "minimize"
    study = study_of(ev, [(0.9, 0.5), (0.5, 0.2), (0.2, 0.1), (0.1, 0.6)])
    assert study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    assert sorted(t.number for t in study.best_trials) == [0, 1, 2]
    assert select_trial(study, ev).number == 2  # the lowest b
    ev.select.objective = None  # weighted, b sign-flipped: 0.2, 0.15, 0.05
    assert select_trial(study, ev).number == 0


def test_pareto_files_and_records(tmp_path):
    ev = evolve(objective="a")
    study = study_of(ev, ROWS)
    data = write_pareto(tmp_path, study, ev, select_trial(study, ev))
    assert json.loads(RunFolder(tmp_path).pareto.read_text()) == data
    assert [r["trial"] for r in data["front"]] == [0, 1, 2] and data["selected"] == 0
    assert data["front"][1]["scores"] == {A: 0.5, B: 0.6} and data["front"][1]["weighted"] == pytest.approx(0.55)
    assert data["rule"] == "highest a"
    assert RunFolder(tmp_path).plots["pareto"].stat().st_size > 1000
    assert trial_record(study.trials[1])["value"] == [0.5, 0.6]


def test_settings_and_samplers_that_cannot_do_multi_objective():
    with pytest.raises(ValueError, match="multi_objective needs at least two objectives"):
        settings("a", multi_objective=True)
    with pytest.raises(ValueError, match="'c' names no objective"):
        settings("a", "b", multi_objective=True, select={"objective": "c"})
    with pytest.raises(ValueError, match="weighted objective or by one objective, not both"):
        settings("a", "b", select={"objective": "a", "weighted": True})
    for name in ("cmaes", "cma", "swarm"):
        with pytest.raises(SamplerSetupError, match=f"sampler '{name}' optimises one value.*nsga2"):
            make_sampler(settings("a", "b", sampler=name, multi_objective=True), expert_space(2))
    for name in ("nsga2", "tpe", "gp", "random"):
        assert make_sampler(settings("a", "b", sampler=name, multi_objective=True), expert_space(2)) is not None


def test_a_select_naming_no_objective_names_the_recipe_line(tmp_path, tiny_llama):
    write_copy_task(tmp_path)
    path = write_recipe(tmp_path, tiny_llama, sampler="nsga2", multi=True, extra="  select: {objective: tiny_copy}\n")
    with pytest.raises(RecipeError, match=r"r.yml:\d+: .*'tiny_copy' names more than one objective"):
        load_recipe(path)


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_multi_objective_run_pareto_best_and_export(tmp_path, tiny_llama):
    write_copy_task(tmp_path)
    path = write_recipe(tmp_path, tiny_llama, sampler="nsga2", multi=True, trials=8, options="{population_size: 4}",
                        extra='  select: {objective: "tiny_copy/perplexity,none"}\n')
    run_dir = tmp_path / "runs" / "mo"
    result = run_cli(path, "-o", run_dir, "--no-progress")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.directions) == 2
    pareto = json.loads(RunFolder(run_dir).pareto.read_text())
    front = {r["trial"]: r for r in pareto["front"]}
    assert set(front) == {t.number for t in study.best_trials}
    chosen = min(front, key=lambda n: (front[n]["scores"]["tiny_copy/perplexity,none"], n))
    assert pareto["selected"] == chosen
    assert json.loads((run_dir / "report.json").read_text())["winner"]["trial"] == chosen
    config = study.trials[chosen].user_attrs["config"]
    assert (run_dir / "best" / "mergekit_config.yml").read_text().strip() == config.strip()
    assert RunFolder(run_dir).plots["pareto"].exists() and (run_dir / "plots" / "history.png").exists()

    other = next(iter(sorted(front)))
    out = tmp_path / "exported"
    result = run_cli("export", run_dir, "--trial", other, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "mergekit_config.yml").read_text().strip() == study.trials[other].user_attrs["config"].strip()
    assert (out / "model.safetensors").exists() and (out / "recipe.yml").exists()
    result = run_cli("export", run_dir, "--pareto", "-o", tmp_path / "front")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == sorted(f"trial-{n}" for n in front)
    result = run_cli("export", run_dir, "--trial", 999, "-o", tmp_path / "none")
    assert result.exit_code == 1 and "has no trial 999" in result.output
