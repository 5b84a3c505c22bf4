"""Cheaper fitness: per-example results equal lm-eval's own scores, are never recomputed, feed pruning and anchors."""

import json
import textwrap

import numpy as np
import optuna
import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from tiny_models import write_copy_task

from mergekit_evolve.evaluate.anchors import AnchorSet, choose_anchors
from mergekit_evolve.recipe.compile import config_digest
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.study.search import run_search
from mergekit_evolve.study.worker import Worker


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheap")
    write_copy_task(root, n_search=24, n_heldout=8)
    return root


def make_recipe(
    workspace, tiny_llama, evolve_extra="", objective_extra="", metric="perplexity,none", goal="minimize",
    task="tiny_copy",
):
    base, v1, v2 = tiny_llama
    path = workspace / "r.yml"
    path.write_text(textwrap.dedent(f"""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - {{model: {v1}, parameters: {{weight: {{search: [0.0, 1.0]}}}}}}
          - {{model: {v2}, parameters: {{weight: {{search: [0.0, 1.0]}}}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: random
          seed: 1
          objectives:
            - {{task: {task}, metric: "{metric}", goal: {goal}, heldout_task: tiny_copy_heldout{objective_extra}}}
          task_paths: [tasks]
        """).lstrip() + textwrap.indent(textwrap.dedent(evolve_extra), "  "))
    return load_recipe(path)


def config_for(tiny_llama, w1, w2):
    base, v1, v2 = map(str, tiny_llama)
    return MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": v1, "parameters": {"weight": w1}}, {"model": v2, "parameters": {"weight": w2}}]})


def test_per_example_scores_equal_lm_eval_and_are_not_recomputed(workspace, tiny_llama):
    recipe = make_recipe(workspace, tiny_llama)
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    config = config_for(tiny_llama, 0.3, 0.8)
    model = worker.merger.materialize(config)
    whole = worker.evaluator.score(model, "search")  # lm-eval's own aggregate over the split
    per_example = worker.evaluator.score(model, "search", digest=config_digest(config))
    assert per_example.values == pytest.approx(whole.values, rel=1e-9)
    computed = worker.evaluator.computed
    assert computed == 24
    again = worker.evaluator.score(model, "search", digest=config_digest(config))
    assert again.values == per_example.values and worker.evaluator.computed == computed
    # a slice then the rest: the slice's examples are reused, not recomputed
    other = config_for(tiny_llama, 0.9, 0.1)
    model = worker.merger.materialize(other)
    worker.evaluator.score(model, "search", digest=config_digest(other), fraction=0.25)
    assert worker.evaluator.computed == computed + 6
    worker.evaluator.score(model, "search", digest=config_digest(other))
    assert worker.evaluator.computed == computed + 24


@pytest.mark.slow
def test_median_pruning_stops_candidates_and_keeps_their_examples(workspace, tiny_llama, tmp_path):
    recipe = make_recipe(workspace, tiny_llama, evolve_extra="""
        pruning:
          pruner: median
          stages: [0.25, 0.5, 1.0]
          options: {n_startup_trials: 2, n_warmup_steps: 0}
        """)
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True, random_seed=1))
    study = run_search(recipe, tmp_path, worker, trials=10, show_progress=False)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states, states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    for t in pruned:
        assert t.user_attrs["pruned_at"] < 1.0 and t.intermediate_values
        # only the slice it was scored on is in the store
        assert worker.evaluator.store.count(t.user_attrs["config_digest"]) < 24
    lines = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert {x["state"] for x in lines} >= {"COMPLETE", "PRUNED"}
    assert (tmp_path / "examples.db").exists()


def test_anchor_choice_by_hand():
    # 3 sources x 6 examples; examples 0-2 behave alike, 3-4 alike, 5 alone
    results = np.array([[1, 1, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    anchors = choose_anchors(results, ids=[10, 11, 12, 13, 14, 15], size=3, seed=0)
    chosen = dict(zip(anchors.ids, anchors.weights, strict=False))
    assert sorted(chosen.values()) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert 15 in chosen and len(chosen) == 3
    plan = type("Plan", (), {"metric": "acc", "filter": "none"})
    rows = [{"acc,none": 1.0 if i == 15 else 0.0} for i in anchors.ids]
    assert anchors.estimate(rows, plan) == pytest.approx(1 / 6)


def test_anchors_asked_for_are_shared_over_few_groups():
    # a merge's sources: base and one expert wrong on every example, the other expert right on 24 of
    # 32, so the sources tell two groups apart; 16 anchors go 12 and 4, not one a group
    results = np.zeros((3, 32))
    results[2, :24] = 1
    anchors = choose_anchors(results, ids=list(range(100, 132)), size=16, seed=0)
    assert len(set(anchors.ids)) == 16 and sum(anchors.weights) == pytest.approx(1.0)
    assert sum(i < 124 for i in anchors.ids) == 12 and anchors.weights == pytest.approx([1 / 16] * 16)
    # more groups than one anchor each: the biggest groups get the rest, and each source's estimate is
    # still its score on the whole split (every group's members behave alike for the sources)
    rng = np.random.default_rng(1)
    results = (rng.random((4, 300)) < 0.9).astype(float)
    anchors = choose_anchors(results, ids=list(range(300)), size=16, seed=3)
    assert len(set(anchors.ids)) == 16
    for source in results:
        assert sum(w * source[i] for i, w in zip(anchors.ids, anchors.weights, strict=True)) == pytest.approx(
            source.mean())
    assert choose_anchors(results, ids=list(range(300)), size=16, seed=3).ids == anchors.ids  # seeded


# anchors without a pruner: trial values are anchor estimates (with one, anchors are its first rung)
ESTIMATE_ONLY = "pruning: {pruner: none}\n"


@pytest.mark.slow
def test_anchor_objective_estimates_search_and_report_uses_full_split(workspace, tiny_llama, tmp_path):
    recipe = make_recipe(workspace, tiny_llama, ESTIMATE_ONLY, objective_extra=", anchors: 4", metric="acc,none",
                         goal="maximize")
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    run_search(recipe, tmp_path, worker, trials=3, show_progress=False)
    (anchor,) = worker.anchor_sets().values()
    assert 1 <= len(anchor.ids) <= 4 and sum(anchor.weights) == pytest.approx(1.0)
    # sources were scored on the whole search split to choose anchors; trials then only on anchors
    before = worker.evaluator.computed
    config = config_for(tiny_llama, 0.11, 0.22)
    worker.score_config(config, "search")  # the report's path: whole split, no anchors
    assert worker.evaluator.computed - before == 24


@pytest.mark.slow
def test_anchor_winner_is_the_finalist_with_the_best_full_search_score(workspace, tiny_llama, tmp_path):
    from mergekit_evolve.report.finalists import best_of_finalists
    from mergekit_evolve.report.winner import winner_config

    recipe = make_recipe(workspace, tiny_llama, ESTIMATE_ONLY, objective_extra=", anchors: 2", metric="acc,none",
                         goal="maximize")
    assert recipe.evolve.estimated
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    study = run_search(recipe, tmp_path, worker, trials=8, show_progress=False)
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))
    full = {t.number: worker.score_config(winner_config(t), "search").weighted(worker.objectives) for t in complete}
    for k in (1, 3, 8):
        worker.recipe.evolve.finalists = k
        top: dict[str, object] = {}
        for t in complete:
            top.setdefault(t.user_attrs["config_digest"], t)
        expected = max(list(top.values())[:k], key=lambda t: (full[t.number], -t.number))
        assert best_of_finalists(study, worker).number == expected.number


def test_more_candidates_tied_at_the_best_estimate_than_finalists_is_warned(caplog):
    """Right-or-wrong anchors plateau: when more distinct candidates tie at the best estimate than are
    re-scored, the winner is only the best of the earliest ones, and the run says so."""
    from types import SimpleNamespace

    from mergekit_evolve.evaluate.scores import Scores
    from mergekit_evolve.report.finalists import best_of_finalists

    def config(weight: float) -> str:
        return f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {weight}}}\n"

    study = optuna.create_study(direction="maximize")
    for i, value in enumerate([0.75, 0.75, 0.75, 0.5]):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}, user_attrs={
            "config": config(i), "config_digest": f"d{i}"}))
    objectives = [SimpleNamespace(name="t", weight=1.0, sign=1)]
    def score_config(config, split):  # the full search score: the config's weight
        return Scores({"t": config.models[0].parameters["weight"]})

    worker = SimpleNamespace(recipe=SimpleNamespace(evolve=SimpleNamespace(estimated=True, finalists=2)),
                             objectives=objectives, score_config=score_config)
    with caplog.at_level("WARNING"):
        assert best_of_finalists(study, worker).number == 1  # the better full score of trials 0 and 1
    assert "3 distinct candidates tie at the best anchor estimate (0.7500) and only the first 2" in caplog.text
    caplog.clear()
    worker.recipe.evolve.finalists = 3
    best_of_finalists(study, worker)
    assert "tie" not in caplog.text


def test_rungs_put_anchors_first_only_under_a_pruner():
    from mergekit_evolve.recipe.evolve_settings import EvolveSettings
    from mergekit_evolve.study.pruning import Rung, rungs

    anchors = {"t/acc,none": AnchorSet([3, 5], [0.5, 0.5])}

    def settings(pruner):
        return EvolveSettings(objectives=[{"task": "t", "anchors": 2}],
                              pruning={"pruner": pruner, "stages": [0.5, 1.0]})

    # no pruner: the anchor estimate is the value, and the winner comes from finalists
    assert rungs(settings("none"), anchors) == (0, [Rung(1.0, anchors)]) and settings("none").estimated
    # a pruner: anchors are step 1 (successive halving's first rung), then the slices to the whole split
    assert rungs(settings("successive_halving"), anchors) == (1, [Rung(0.5, anchors), Rung(0.5), Rung(1.0)])
    assert not settings("median").estimated
    assert rungs(settings("median"), {}) == (0, [Rung(0.5), Rung(1.0)])


def test_auto_pruner_halves_slices_or_cuts_on_the_anchors():
    from mergekit_evolve.recipe.evolve_settings import EvolveSettings

    plain = EvolveSettings(sampler="tpe", objectives=[{"task": "t"}])
    assert plain.pruning.pruner == "successive_halving" and plain.pruning.stages == [0.25, 0.5, 1.0]
    anchored = EvolveSettings(sampler="random", objectives=[{"task": "t", "anchors": 16}])
    assert anchored.pruning.model_dump() == {
        "pruner": "percentile", "stages": [1.0], "options": {"percentile": 25.0, "n_startup_trials": 4}}
    # what the recipe sets is kept
    own = EvolveSettings(sampler="gp", objectives=[{"task": "t", "anchors": 16}],
                         pruning={"stages": [0.5, 1.0], "options": {"percentile": 40}})
    assert own.pruning.stages == [0.5, 1.0] and own.pruning.options == {"percentile": 40, "n_startup_trials": 4}
    # population methods see every member's full score: CMA-ES (the default, as the paper ran it) too
    for other in ({}, {"sampler": "cmaes"}, {"sampler": "cma"}, {"sampler": "cycleqd"}, {"sampler": "swarm"},
                  {"multi_objective": True, "sampler": "tpe", "objectives": [{"task": "t"}, {"task": "u"}]}):
        assert EvolveSettings(**{"objectives": [{"task": "t", "anchors": 16}], **other}).pruning.pruner == "none"


def test_percentile_pruner_needs_its_percentile():
    from mergekit_evolve.recipe.evolve_settings import PruningSettings
    from mergekit_evolve.study.pruning import make_pruner

    pruner = make_pruner(PruningSettings(pruner="percentile", options={"percentile": 25, "n_startup_trials": 4}))
    assert isinstance(pruner, optuna.pruners.PercentilePruner)
    with pytest.raises(ValueError, match="do not fit pruner 'percentile'"):
        make_pruner(PruningSettings(pruner="percentile"))


def write_loglikelihood_task(workspace) -> str:
    """``tiny_copy`` scored by the mean log-likelihood of the answer: a mean-aggregated metric (anchors
    need one) that, unlike accuracy, differs between any two tiny merges (so a pruner has ranks to cut)."""
    text = (workspace / "tasks" / "tiny_copy.yaml").read_text()
    text = text.replace("task: tiny_copy", "task: tiny_copy_ll").replace(
        "aggregation: perplexity\n    higher_is_better: false", "aggregation: mean\n    higher_is_better: true"
    )
    (workspace / "tasks" / "tiny_copy_ll.yaml").write_text(text)
    return "tiny_copy_ll"


@pytest.mark.slow
def test_anchors_as_first_rung_prune_there_and_completed_values_are_full_scores(workspace, tiny_llama, tmp_path):
    from mergekit_evolve.report.finalists import best_of_finalists

    task = write_loglikelihood_task(workspace)
    # pruner auto with anchors: the percentile pruner on the anchor estimate, then the whole split
    recipe = make_recipe(workspace, tiny_llama, objective_extra=", anchors: 4", metric="perplexity,none",
                         goal="maximize", task=task)
    assert recipe.evolve.pruning.pruner == "percentile" and not recipe.evolve.estimated
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    study = run_search(recipe, tmp_path, worker, trials=10, show_progress=False)
    (anchor,) = worker.anchor_sets().values()
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete
    for t in pruned:  # stopped on their anchor estimate: only the anchors ran
        assert t.user_attrs["pruned_at"] == "anchors" and list(t.intermediate_values) == [1]
        assert worker.evaluator.store.count(t.user_attrs["config_digest"]) == len(anchor.ids)
    for t in complete:  # survivors: the whole split, the anchor examples reused rather than run twice
        assert worker.evaluator.store.count(t.user_attrs["config_digest"]) == 24
        model = worker.merger.materialize(MergeConfiguration.model_validate(yaml.safe_load(t.user_attrs["config"])))
        whole = worker.evaluator.score(model, "search").values[f"{task}/perplexity,none"]  # lm-eval over the split
        assert t.value == pytest.approx(whole, rel=1e-6)  # anchors ran in another batch: float32 rounding only
    sources = 3 * 24  # choosing the anchors scores base and both experts on the whole split
    assert worker.evaluator.computed == sources + len(anchor.ids) * len(pruned) + 24 * len(complete)
    # completed values are full scores: the study's best trial wins, no finalists re-scored
    computed = worker.evaluator.computed
    assert best_of_finalists(study, worker).number == study.best_trial.number
    assert worker.evaluator.computed == computed

    # a resumed run proposing a pruned config again reruns nothing it already ran
    again = pruned[0]
    study.enqueue_trial(again.params)
    resumed = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    study = run_search(recipe, tmp_path, resumed, trials=len(complete) + 1, show_progress=False)
    last = study.trials[len(pruned) + len(complete)]  # the enqueued one (pruned, the run goes on to a completed trial)
    assert last.params == again.params and resumed.anchor_sets()[f"{task}/perplexity,none"].ids == anchor.ids
    later = study.trials[last.number + 1:]  # new configs the run went on to, to reach its completed trials
    cost = sum(24 if t.state == optuna.trial.TrialState.COMPLETE else len(anchor.ids) for t in later)
    assert resumed.evaluator.computed == cost + (0 if last.state == optuna.trial.TrialState.PRUNED
                                                 else 24 - len(anchor.ids))


def test_another_setting_on_the_same_worker_scores_its_candidates_afresh(workspace, tiny_llama, tmp_path):
    # benchmarks compare settings on one worker: the same seed proposes the same first candidates, which
    # must cost what they cost a fresh run, not come from the store of the setting before
    recipe = make_recipe(workspace, tiny_llama)
    worker = Worker(recipe, MergeOptions(device="cpu", quiet=True))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_search(recipe, tmp_path / "a", worker, trials=2, show_progress=False)
    first = worker.evaluator.computed
    worker.use_recipe(make_recipe(workspace, tiny_llama))
    run_search(worker.recipe, tmp_path / "b", worker, trials=2, show_progress=False)
    assert worker.evaluator.computed == 2 * first
