"""Objectives that are not lm-eval tasks (a Python function, a reward model) score through the same
per-example store, slices and anchors as tasks do."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
import transformers

from mergekit_evolve.evaluate.anchors import AnchorSet
from mergekit_evolve.evaluate.example_objectives import ObjectiveError, TaskSetupError
from mergekit_evolve.evaluate.suite import Evaluator, TaskSuite
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from tests.tiny_models import char_tokenizer

FITNESS = '''\
CALLS = []


def score(model, tokenizer, examples):
    CALLS.append([e["text"] for e in examples])
    out = []
    for e in examples:
        ids = tokenizer(e["text"], return_tensors="pt")["input_ids"]
        out.append(-float(model(input_ids=ids, labels=ids).loss))
    return out


def broken(model, tokenizer, examples):
    return [len(e["text"]) / 0 for e in examples]
'''


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def folder(tmp_path) -> Path:
    (tmp_path / "fitness.py").write_text(FITNESS)
    write_jsonl(tmp_path / "search.jsonl", [{"text": f"ab{i}c", "prompt": f"{i}:"} for i in range(8)])
    write_jsonl(tmp_path / "heldout.jsonl", [{"text": f"xy{i}", "prompt": f"{i}="} for i in range(3)])
    return tmp_path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A tiny random Llama reward head over the tests' character tokenizer: one output, its logit the reward."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=43, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    out = tmp_path_factory.mktemp("reward")
    transformers.LlamaForSequenceClassification(config).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def evaluator_for(settings: dict, base: Path, tiny_llama) -> tuple[Evaluator, transformers.PreTrainedModel]:
    suite = TaskSuite(EvolveSettings.model_validate(settings), base)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[1]).eval()
    return Evaluator(suite, transformers.AutoTokenizer.from_pretrained(tiny_llama[1])), model


def python_settings(**extra) -> dict:
    return {"objectives": [{"python": "fitness.py:score", "data": "search.jsonl",
                            "heldout_data": "heldout.jsonl", **extra}]}


def test_python_objective_is_the_mean_of_its_examples_and_stored_per_config(folder, tiny_llama):
    evaluator, model = evaluator_for(python_settings(), folder, tiny_llama)
    calls = evaluator.suite.scorers["score"].function.__globals__["CALLS"]
    whole = evaluator.score(model, "search", digest="d1")
    rows = evaluator.store.get("d1", evaluator.plan(evaluator.suite.settings.objectives[0], "search").task,
                               list(range(8)))
    assert len(rows) == 8 and evaluator.computed == 8
    assert whole.values["score"] == pytest.approx(sum(r["score,none"] for r in rows.values()) / 8)
    # the same config again, or any slice of it: nothing runs through the function
    assert evaluator.score(model, "search", digest="d1").values == whole.values
    evaluator.score(model, "search", digest="d1", fraction=0.25)
    assert evaluator.computed == 8 and len(calls) == 1
    # the held-out split is its own file
    held = evaluator.score(model, "heldout", digest="d1")
    assert (evaluator.computed == 11 and [len(c) for c in calls] == [8, 3]
            and held.values["score"] != whole.values["score"])
    # another config is scored again
    evaluator.score(model, "search", digest="d2", fraction=0.5)
    assert evaluator.computed == 15 and len(calls[-1]) == 4


def test_fraction_and_anchors_pick_examples_like_a_task(folder, tiny_llama):
    evaluator, model = evaluator_for(python_settings(limit=6), folder, tiny_llama)
    objective = evaluator.suite.settings.objectives[0]
    plan = evaluator.plan(objective, "search")
    assert plan.ids == list(range(6)) and plan.aggregate.__name__ == "mean"  # anchors accept it
    first = evaluator.order(plan)[:3]
    half = evaluator.score(model, "search", digest="d", fraction=0.5)
    rows = evaluator.rows(model, "d", plan, first)
    assert half.values["score"] == pytest.approx(sum(r["score,none"] for r in rows) / 3)
    anchors = {"score": AnchorSet([4, 1], [0.75, 0.25])}
    estimate = evaluator.score(model, "search", digest="d", anchors=anchors).values["score"]
    a4, a1 = (r["score,none"] for r in evaluator.rows(model, "d", plan, [4, 1]))
    assert estimate == pytest.approx(0.75 * a4 + 0.25 * a1)


def test_an_error_in_the_users_function_is_one_line_naming_its_file_and_line(folder, tiny_llama):
    evaluator, model = evaluator_for({"objectives": [{"python": "fitness.py:broken", "data": "search.jsonl"}]},
                                     folder, tiny_llama)
    with pytest.raises(ObjectiveError) as error:
        evaluator.score(model, "search", digest="d")
    assert str(error.value) == "fitness.py:14: ZeroDivisionError: division by zero"


@pytest.mark.parametrize(("change", "message"), [
    ({"python": "missing.py:score"}, "python: no file 'missing.py'"),
    ({"python": "fitness.py:nothing"}, "python: fitness.py has no function 'nothing'"),
    ({"python": "no_such_module_here:score"}, "python: cannot import 'no_such_module_here'"),
    ({"data": "absent.jsonl"}, "data: no file 'absent.jsonl'"),
    ({"data": "empty.jsonl"}, "data: empty.jsonl has no examples"),
    ({"data": "bad.jsonl"}, "data: bad.jsonl:2 is not JSON"),
    ({"heldout_data": "list.jsonl"}, "heldout_data: list.jsonl:1 is a list, not a JSON object"),
])
def test_what_is_wrong_before_weights_load_names_the_field(folder, change, message):
    (folder / "empty.jsonl").write_text("\n")
    (folder / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    (folder / "list.jsonl").write_text("[1, 2]\n")
    settings = EvolveSettings.model_validate({"objectives": [{"python": "fitness.py:score",
                                                              "data": "search.jsonl", **change}]})
    with pytest.raises(TaskSetupError) as error:
        TaskSuite(settings, folder)
    assert str(error.value).startswith(message) and error.value.field == next(iter(change))


def test_an_objective_names_one_kind():
    with pytest.raises(ValueError, match="names exactly one of 'task'"):
        EvolveSettings.model_validate({"objectives": [{"task": "a", "python": "f.py:g", "data": "d.jsonl"}]})
    with pytest.raises(ValueError, match="Extra inputs"):
        EvolveSettings.model_validate({"objectives": [{"python": "f.py:g", "data": "d.jsonl", "metric": "acc,none"}]})


def test_reward_objective_scores_generations_with_the_reward_model(folder, tiny_llama, reward_model):
    settings = {"objectives": [{"reward_model": str(reward_model), "prompts": "search.jsonl",
                                "generation": {"max_new_tokens": 3}}]}
    evaluator, model = evaluator_for(settings, folder, tiny_llama)
    objective = evaluator.suite.settings.objectives[0]
    scorer = evaluator.suite.scorers[objective.name]
    scorer.check()
    value = evaluator.score(model, "search", digest="d", fraction=0.25).values[objective.name]
    ids = evaluator.order(evaluator.plan(objective, "search"))[:2]
    # by hand: greedy answers, each prompt + answer through the reward model
    tok = evaluator.tokenizer
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    expected = []
    for i in ids:
        prompt = scorer.examples["search"][i]["prompt"]
        ids_in = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids_in, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids_in.shape[1]:], skip_special_tokens=True)
        with torch.no_grad():
            expected.append(float(reward(**tok(prompt + answer, return_tensors="pt")).logits[0, 0]))
    assert value == pytest.approx(sum(expected) / 2, abs=1e-5)
    computed = evaluator.computed
    evaluator.score(model, "search", digest="d", fraction=0.25)
    assert evaluator.computed == computed == 2
    assert any(p.name == "model.safetensors" for p in scorer.files())


def test_reward_model_problems_are_found_without_weights(folder, reward_model, tmp_path):
    def check(**change):
        settings = EvolveSettings.model_validate(
            {"objectives": [{"reward_model": str(reward_model), "prompts": "search.jsonl", **change}]})
        TaskSuite(settings, folder).scorers[settings.objectives[0].name].check()

    check()
    with pytest.raises(TaskSetupError, match="label: the reward model has no label 'good'"):
        check(label="good")
    with pytest.raises(TaskSetupError, match="reward_model: no config.json"):
        check(reward_model=str(tmp_path))
    write_jsonl(folder / "noprompt.jsonl", [{"text": "a"}])
    with pytest.raises(TaskSetupError, match="prompts: example 1 has no 'prompt' string"):
        check(prompts="noprompt.jsonl")


def test_sampled_answers_do_not_depend_on_their_batch(tiny_llama):
    from mergekit_evolve.evaluate.example_objectives import complete
    from mergekit_evolve.recipe.evolve_settings import GenerationSettings

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[1]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama[1])
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, seed=3)
    prompts = ["ab:", "cd:", "ef:"]
    together = complete(model, tok, prompts, [0, 1, 2], sampled, False)
    assert complete(model, tok, prompts[2:], [2], sampled, False) == together[2:]
    assert complete(model, tok, prompts, [0, 1, 2], sampled.model_copy(update={"seed": 4}), False) != together


def run_recipe_text(tiny_llama, objective: str) -> str:
    base, v1, v2 = tiny_llama
    return f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {v1}
    parameters: {{weight: {{search: [0.0, 1.0]}}}}
  - model: {v2}
    parameters: {{weight: {{search: [0.0, 1.0]}}}}
dtype: float32
evolve:
  sampler: random
  trials: 2
  seed: 3
  allow_constant_objectives: true
  pruning: {{pruner: none}}
  device: cpu
  threads: 1
  objectives:
    - {objective}
"""


def resume_scores_nothing_twice(folder: Path, recipe: str, monkeypatch) -> list[tuple[str, float, tuple[int, ...]]]:
    """Run 2 trials, then resume to 4: no model (told apart by its weights) is scored again on an example
    the first run scored. Returns the second run's calls."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import cli
    from mergekit_evolve.evaluate.example_objectives import ExampleScorer

    calls: list[tuple[str, float, tuple[int, ...]]] = []
    rows = ExampleScorer.rows

    def counted(self, model, tokenizer, split, ids):
        weights = sum(float(p.double().sum()) for p in model.parameters())
        calls.append((split, weights, tuple(ids)))
        return rows(self, model, tokenizer, split, ids)

    monkeypatch.setattr(ExampleScorer, "rows", counted)
    path = folder / "recipe.yml"
    path.write_text(recipe)
    run_dir = folder / "run"
    for trials in (2, 4):
        if trials == 4:
            first, calls[:] = list(calls), []
        result = CliRunner().invoke(cli, ["run", str(path), "-o", str(run_dir), "--trials", str(trials),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
    done = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert sum(t["state"] == "COMPLETE" for t in done) == 4
    scored = {(split, w, i) for split, w, ids in first for i in ids}
    # the resume's start-point check too reads the run folder's store: it scores nothing again
    again = [c for c in calls if any((c[0], c[1], i) in scored for i in c[2])]
    assert not again and calls, (again, calls)
    return calls


@pytest.mark.slow
def test_python_objective_run_resumes_without_rescoring(folder, tiny_llama, monkeypatch):
    objective = "{python: fitness.py:score, data: search.jsonl, heldout_data: heldout.jsonl}"
    resume_scores_nothing_twice(folder, run_recipe_text(tiny_llama, objective), monkeypatch)


@pytest.mark.slow
def test_reward_objective_run_resumes_without_rescoring(folder, tiny_llama, reward_model, monkeypatch):
    objective = f"{{reward_model: {reward_model}, prompts: search.jsonl, generation: {{max_new_tokens: 4}}}}"
    resume_scores_nothing_twice(folder, run_recipe_text(tiny_llama, objective), monkeypatch)
    report = json.loads((folder / "run" / "report.json").read_text())
    assert set(report["winner"]["per_objective"]["heldout"]) == {f"reward:{reward_model.name}"}


@pytest.mark.parametrize(("objective", "line", "message"), [
    ("{python: fitness.py:nothing, data: search.jsonl}", 2,
     "evolve.objectives[1].python: fitness.py has no function 'nothing'"),
    ("{python: fitness.py:score,\n       data: missing.jsonl}", 3,
     "evolve.objectives[1].data: no file 'missing.jsonl'"),
    ("{task: tiny, python: fitness.py:score, data: search.jsonl}", 2,
     "evolve.objectives.1: an objective names exactly one of 'task' (lm-eval), 'python'"),
    ("{python: fitness.py:score, data: search.jsonl, metric: acc}", 2,
     "evolve.objectives.1.metric: Extra inputs are not permitted"),
])
def test_the_preflight_names_the_recipe_line_of_a_broken_objective(folder, tiny_llama, objective, line, message):
    from mergekit_evolve.preflight import check_tasks
    from mergekit_evolve.recipe.document import load_document
    from mergekit_evolve.recipe.yaml_lines import RecipeError

    text = run_recipe_text(tiny_llama, "{python: fitness.py:score, data: search.jsonl, name: fine}\n    - " + objective)
    path = folder / "recipe.yml"
    path.write_text(text)
    first = text.splitlines().index("  objectives:") + 1
    with pytest.raises(RecipeError) as error:
        check_tasks(load_document(path).recipe(), load=False)
    assert str(error.value).startswith(f"{path}:{first + line}: {message}"), str(error.value)


def test_the_runs_task_files_hash_the_code_and_data_so_a_resume_notices_a_change(folder):
    suite = TaskSuite(EvolveSettings.model_validate(python_settings()), folder)
    files = suite.files()
    assert set(files) == {"fitness.py", "search.jsonl", "heldout.jsonl"}
    write_jsonl(folder / "search.jsonl", [{"text": "changed"}])
    assert (TaskSuite(EvolveSettings.model_validate(python_settings()), folder).files()["search.jsonl"]
            != files["search.jsonl"])


def test_judge_objective_is_the_judges_expected_rating_of_each_answer(folder, tiny_llama):
    judge_folder = tiny_llama[2]
    rubric = "{prompt}={answer}:"
    settings = {"objectives": [{"judge_model": str(judge_folder), "prompts": "search.jsonl", "rubric": rubric,
                                "ratings": ["1", "2", "3"], "generation": {"max_new_tokens": 3}}]}
    evaluator, model = evaluator_for(settings, folder, tiny_llama)
    objective = evaluator.suite.settings.objectives[0]
    scorer = evaluator.suite.scorers[objective.name]
    scorer.check()
    value = evaluator.score(model, "search", digest="d", fraction=0.25).values[objective.name]
    # by hand: greedy answers, the judge's next-token probabilities over 1, 2, 3 after the filled rubric
    tok = evaluator.tokenizer
    judge = transformers.AutoModelForCausalLM.from_pretrained(judge_folder).eval()
    expected = []
    for i in evaluator.order(evaluator.plan(objective, "search"))[:2]:
        prompt = scorer.examples["search"][i]["prompt"]
        ids_in = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids_in, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids_in.shape[1]:], skip_special_tokens=True)
        with torch.no_grad():
            logits = judge(**tok(f"{prompt}={answer}:", return_tensors="pt")).logits[0, -1]
        probs = logits[[tok.convert_tokens_to_ids(r) for r in "123"]].softmax(-1)
        expected.append(float(probs @ torch.tensor([1.0, 2.0, 3.0])))
    assert value == pytest.approx(sum(expected) / 2, abs=1e-5) and 1 < value < 3
    with pytest.raises(TaskSetupError, match="ratings: '10' is 2 tokens"):
        TaskSuite(EvolveSettings.model_validate(
            {"objectives": [{**settings["objectives"][0], "ratings": ["1", "10"]}]}),
            folder).scorers[objective.name].check()
    with pytest.raises(ValueError, match="must hold {answer}"):
        EvolveSettings.model_validate({"objectives": [{**settings["objectives"][0], "rubric": "{prompt}"}]})


def test_a_parsed_judge_reads_the_rating_from_its_reply_and_counts_the_replies_it_cannot_read(folder, tiny_llama):
    judge_folder = tiny_llama[2]
    ratings = [str(r) for r in range(10)]
    settings = {"objectives": [{"judge_model": str(judge_folder), "prompts": "search.jsonl",
                                "rubric": "{prompt}={answer}:", "scoring": "parse", "ratings": ratings,
                                "pattern": "^([0-9])",
                                "generation": {"max_new_tokens": 3}, "judge_generation": {"max_new_tokens": 4}}]}
    evaluator, model = evaluator_for(settings, folder, tiny_llama)
    objective = evaluator.suite.settings.objectives[0]
    evaluator.suite.scorers[objective.name].check()  # ratings of two digits would not be one token: parsed, fine
    scores = evaluator.score(model, "search", digest="d")
    # by hand: the judge's greedy reply to each filled rubric, its first character a digit or unread (scored 0)
    tok = evaluator.tokenizer
    judge = transformers.AutoModelForCausalLM.from_pretrained(judge_folder).eval()

    def reply(m, text, n):
        ids_in = tok(text, return_tensors="pt")["input_ids"]
        out = m.generate(ids_in, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids_in.shape[1]:], skip_special_tokens=True)

    read = []
    for e in evaluator.suite.scorers[objective.name].examples["search"]:
        first = reply(judge, f"{e['prompt']}={reply(model, e['prompt'], 3)}:", 4)[:1]
        read.append(int(first) if first.isdigit() else None)
    failed = sum(r is None for r in read)
    assert 0 < failed < len(read), read  # both paths taken
    assert scores.unparsed == {objective.name: (failed, len(read))}
    assert scores.values[objective.name] == pytest.approx(sum(r or 0 for r in read) / len(read))
    # stored with the rows: scoring again from the store counts the same
    assert evaluator.score(model, "search", digest="d").unparsed == scores.unparsed


@pytest.mark.parametrize(("settings", "reply", "expected"), [
    ({}, "4 out of 5", 4.0),
    ({}, "rating: 2.5.", 2.5),
    ({}, "7", None),  # outside the ratings' range
    ({}, "no idea", None),
    ({"pattern": r"\[\[(\d+)\]\]"}, "3 points, so [[5]]", 5.0),
    ({"mode": "pairwise"}, "[[B]]", 1.0),
    ({"mode": "pairwise"}, "And so A is better", 0.0),  # a verdict standing alone, not a word's first letter
    ({"mode": "pairwise"}, "Both are fine", None),
])
def test_a_parsed_judges_default_patterns(folder, settings, reply, expected):
    from mergekit_evolve.evaluate.judge import JudgeScorer
    from mergekit_evolve.recipe.evolve_settings import JudgeObjective

    objective = JudgeObjective.model_validate({"judge_model": "j", "prompts": "search.jsonl", "scoring": "parse",
                                               **settings})
    scorer = JudgeScorer(objective, folder, False)
    assert scorer.read(reply) == expected
    assert scorer.unparsed_score() == (0.5 if settings.get("mode") == "pairwise" else 1.0)


@pytest.mark.slow
def test_an_error_in_the_users_function_fails_the_trial_with_its_file_and_line(folder, tiny_llama):
    from click.testing import CliRunner

    from mergekit_evolve.cli import cli

    # passes the start-point check (one example), fails every trial (the whole split)
    (folder / "picky.py").write_text("def score(model, tokenizer, examples):\n"
                                     "    assert len(examples) == 1, f'{len(examples)} examples'\n"
                                     "    return [0.5]\n")
    path = folder / "recipe.yml"
    path.write_text(run_recipe_text(tiny_llama, "{python: picky.py:score, data: search.jsonl}"))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(folder / "run"), "--no-progress"])
    assert result.exit_code != 0
    line = "picky.py:2: AssertionError: 8 examples"
    assert f"same error, so the search stopped: {line}" in result.output, result.output
    failed = [json.loads(t) for t in (folder / "run" / "trials.jsonl").read_text().splitlines()]
    assert [t["error"] for t in failed] == [line, line]


def test_answers_go_through_the_chat_template_when_the_recipe_asks(tiny_llama):
    from mergekit_evolve.evaluate.example_objectives import complete
    from mergekit_evolve.recipe.evolve_settings import GenerationSettings

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[1]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama[1])
    tok.chat_template = "{% for m in messages %}:{{ m['content'] }}={% endfor %}"
    greedy = GenerationSettings(max_new_tokens=5)
    templated = complete(model, tok, ["ab", "cd"], [0, 1], greedy, True)
    assert templated == complete(model, tok, [":ab=", ":cd="], [0, 1], greedy, False)
    assert templated != complete(model, tok, ["ab", "cd"], [0, 1], greedy, False)


def pairwise_objective(judge: Path, **extra) -> dict:
    # the tests' tokenizer has no capitals: its verdicts are lower-case
    return {"judge_model": str(judge), "prompts": "search.jsonl", "mode": "pairwise", "verdicts": ["a", "b"],
            "rubric": "{prompt}={answer_a} {answer_b}:", "generation": {"max_new_tokens": 3}, **extra}


def test_pairwise_judge_prefers_the_candidate_over_the_reference_in_both_orders(folder, tiny_llama, judge_model):
    from mergekit_evolve.evaluate.judge import Reference

    evaluator, model = evaluator_for({"objectives": [pairwise_objective(judge_model)]}, folder, tiny_llama)
    objective = evaluator.suite.settings.objectives[0]
    scorer = evaluator.suite.scorers[objective.name]
    scorer.check()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[0]).eval()
    tok = evaluator.tokenizer
    with pytest.raises(RuntimeError, match="reference's answers were not generated"):
        scorer.score(model, tok, [0], scorer.examples["search"][:1])
    scorer.reference = Reference(str(tiny_llama[0]), tiny_llama[0])
    scorer.answer_references(reference, tok)
    value = evaluator.score(model, "search", digest="d", fraction=0.25).values[objective.name]
    # by hand: the judge's probability of the candidate's verdict with the candidate first, then second
    judge = transformers.AutoModelForCausalLM.from_pretrained(judge_model).eval()
    verdicts = [tok.convert_tokens_to_ids(v) for v in "ab"]

    def answer(m, prompt):
        ids_in = tok(prompt, return_tensors="pt")["input_ids"]
        out = m.generate(ids_in, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids_in.shape[1]:], skip_special_tokens=True)

    def prefers(text, which):
        with torch.no_grad():
            return float(judge(**tok(text, return_tensors="pt")).logits[0, -1, verdicts].softmax(-1)[which])

    expected = []
    for i in evaluator.order(evaluator.plan(objective, "search"))[:2]:
        prompt = scorer.examples["search"][i]["prompt"]
        cand, ref = answer(model, prompt), answer(reference, prompt)
        assert cand != ref  # else the test would not tell the orders apart
        expected.append((prefers(f"{prompt}={cand} {ref}:", 0) + prefers(f"{prompt}={ref} {cand}:", 1)) / 2)
    assert value == pytest.approx(sum(expected) / 2, abs=1e-5) and 0 < value < 1
    # the reference judged against itself: both orders cancel to exactly a tie
    assert scorer.score(reference, tok, [0, 1], scorer.examples["search"][:2]) == pytest.approx([0.5, 0.5], abs=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    ({"ratings": ["1", "2"]}, "ratings belong(s) to mode: single"),
    ({"rubric": "{prompt}={answer_a}:"}, "the pairwise rubric must hold {answer_a} and {answer_b}"),
    ({"rubric_file": "r.txt"}, "give the rubric or a rubric_file, not both"),
    ({"verdicts": ["a", "a"]}, "must be two different tokens"),
    ({"mode": "single"}, "reference, verdicts belong(s) to mode: pairwise"),
])
def test_pairwise_settings_that_do_not_fit_the_mode_are_refused(change, message):
    objective = {**pairwise_objective(Path("j")), "reference": "m", **change}
    if change.get("mode") == "single":
        objective.pop("rubric")
    with pytest.raises(ValueError, match=re.escape(message)):
        EvolveSettings.model_validate({"objectives": [objective]})


def test_pairwise_rubric_file_verdicts_and_reference_are_checked_before_weights_load(folder, tiny_llama, judge_model):
    from mergekit_evolve.preflight import check_tasks
    from mergekit_evolve.recipe.document import load_document
    from mergekit_evolve.recipe.yaml_lines import RecipeError

    def suite(**change):
        objective = {k: v for k, v in pairwise_objective(judge_model, **change).items() if v is not None}
        return TaskSuite(EvolveSettings.model_validate({"objectives": [objective]}), folder)

    (folder / "rubric.txt").write_text("{prompt} {answer_a}:")
    with pytest.raises(TaskSetupError, match=re.escape("rubric_file: rubric.txt: the pairwise rubric must hold")):
        suite(rubric=None, rubric_file="rubric.txt")
    (folder / "rubric.txt").write_text("{prompt} {answer_a}={answer_b}:")
    scorer = next(iter(suite(rubric=None, rubric_file="rubric.txt").scorers.values()))
    assert scorer.rubric == "{prompt} {answer_a}={answer_b}:" and folder / "rubric.txt" in scorer.files()
    with pytest.raises(TaskSetupError, match="verdicts: .* not all different tokens"):  # A and B: both unknown
        next(iter(suite(verdicts=["A", "B"]).scorers.values())).check()
    path = folder / "recipe.yml"
    objective = (f"{{judge_model: {judge_model}, prompts: search.jsonl, mode: pairwise, verdicts: [a, b], "
                 "reference: nowhere}")
    path.write_text(run_recipe_text(tiny_llama, objective))
    with pytest.raises(RecipeError, match=re.escape("evolve.objectives[0].reference: 'nowhere' is not one of the "
                                                    "recipe's models")):
        check_tasks(load_document(path).recipe(), load=False)


def test_a_pairwise_judges_reference_is_the_base_by_default_and_hashed_with_the_runs_files(folder, tiny_llama,
                                                                                            judge_model):
    from mergekit_evolve.recipe.document import load_document
    from mergekit_evolve.study.worker import attach_references, merge_options, reference_source

    path = folder / "recipe.yml"
    files = {}
    for reference in ("", f", reference: {tiny_llama[2]}"):
        path.write_text(run_recipe_text(tiny_llama, f"{{judge_model: {judge_model}, prompts: search.jsonl, "
                                                    f"mode: pairwise{reference}}}"))
        recipe = load_document(path).recipe()
        objective = recipe.evolve.objectives[0]
        suite = TaskSuite(recipe.evolve, folder)
        attach_references(recipe, suite, merge_options(recipe))
        files[reference] = suite.files()
        assert str(reference_source(recipe, objective)) == str(tiny_llama[2] if reference else tiny_llama[0])
    assert any("model.safetensors" in f for f in files[""]) and files[""] != files[f", reference: {tiny_llama[2]}"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "pairwise"])
def test_judge_objective_run_resumes_without_rescoring(folder, tiny_llama, judge_model, mode, monkeypatch):
    from mergekit_evolve.evaluate.judge import JudgeScorer

    references = []
    answer = JudgeScorer.answer_references
    monkeypatch.setattr(JudgeScorer, "answer_references",
                        lambda self, model, tok: references.append(self.reference) or answer(self, model, tok))
    extra = (f"mode: pairwise, verdicts: [a, b], reference: {tiny_llama[1]}" if mode == "pairwise"
             else "ratings: ['1', '2']")
    objective = f"{{judge_model: {judge_model}, prompts: search.jsonl, {extra}, generation: {{max_new_tokens: 3}}}}"
    resume_scores_nothing_twice(folder, run_recipe_text(tiny_llama, objective), monkeypatch)
    report = json.loads((folder / "run" / "report.json").read_text())
    value = report["winner"]["per_objective"]["heldout"][f"judge:{judge_model.name}"]
    if mode == "pairwise":  # one process per run: the reference answered once in each
        assert [r.name for r in references] == [str(tiny_llama[1])] * 2 and 0 < value < 1
    else:
        assert not references and 1 < value < 2



COUNTED_FITNESS = '''\
import json
import os


def score(model, tokenizer, examples):
    # every call as it happens (stored or not): the model, told apart by its weights, and each example
    weights = sum(float(p.double().sum()) for p in model.parameters())
    with open(os.environ["FITNESS_LOG"], "a", encoding="utf-8") as f:
        f.writelines(json.dumps([weights, e["text"]]) + "\\n" for e in examples)
    out = []
    for e in examples:
        ids = tokenizer(e["text"], return_tensors="pt")["input_ids"]
        out.append(-float(model(input_ids=ids, labels=ids).loss))
    return out
'''


def interrupt_objective(kind: str, folder: Path, reward: Path, judge: Path) -> str:
    if kind == "task":
        from tests.tiny_models import write_copy_task

        write_copy_task(folder, n_search=8, n_heldout=4)
        return '{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}\n  task_paths: [tasks]'
    if kind == "python":
        (folder / "counted.py").write_text(COUNTED_FITNESS)
        return "{python: counted.py:score, data: search.jsonl, heldout_data: heldout.jsonl}"
    if kind == "reward":
        return f"{{reward_model: {reward}, prompts: search.jsonl, generation: {{max_new_tokens: 3}}}}"
    # the judge's replies parsed: the count of unreadable ones is stored with the rows too
    where = "openai:tiny-judge" if kind == "endpoint" else f"{judge}, scoring: parse"
    return f"{{judge_model: {where}, prompts: search.jsonl, generation: {{max_new_tokens: 3}}}}"


@pytest.fixture()
def judge_server(judge_model, monkeypatch):
    """The judge behind a local OpenAI-compatible endpoint, its URL where the recipe's default endpoint looks."""
    from tests.openai_server import serving

    with serving(judge_model) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["task", "python", "reward", "judge", "endpoint"])
def test_an_interrupted_run_resumes_scoring_nothing_twice(folder, tiny_llama, reward_model, judge_model, kind,
                                                         monkeypatch, request):
    """Ctrl-C a run (a subprocess) after two trials, then the same command to two more (in this process:
    a second subprocess costs its imports again): across both no config is scored twice on one example of
    one objective. Each logs every row it stores (tests/stored_rows); rows of the interrupted trial that were
    never stored are not logged and may be computed again. The python kind also logs every call of the
    user's function itself: there only the interrupted trial's model may score an example twice."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import cli
    from mergekit_evolve.evaluate.example_store import ExampleStore
    from tests.recipe.test_bad_input import REPO, interruptible
    from tests.stored_rows.sitecustomize import logging_put

    if kind == "endpoint":
        request.getfixturevalue("judge_server")
    path = folder / "recipe.yml"
    path.write_text(run_recipe_text(tiny_llama, interrupt_objective(kind, folder, reward_model, judge_model)))
    run_dir, stored, fitness = folder / "run", folder / "stored.jsonl", folder / "fitness.jsonl"
    paths = [str(REPO / "tests" / "stored_rows"), str(REPO), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "STORED_ROWS_LOG": str(stored),
           "FITNESS_LOG": str(fitness), "COLUMNS": "200"}  # the message on one line, however rich wraps

    def args(trials: int) -> list[str]:
        return [str(path), "-o", str(run_dir), "--no-progress", "--trials", str(trials)]

    proc = subprocess.Popen([sys.executable, "-m", "mergekit_evolve", *args(1000)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=folder, preexec_fn=interruptible)
    trials = run_dir / "trials.jsonl"
    try:
        while not (trials.exists() and len(trials.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # a run that ignored the Ctrl-C would go on to its 1000 trials
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err and [line for line in (out + err).splitlines() if "interrupted" in line] == [
        "interrupted: finished trials are kept in the study; run the same command to resume."]
    first = stored.read_text().splitlines()
    before_resume = len(fitness.read_text().splitlines()) if kind == "python" else 0
    done = [json.loads(line) for line in trials.read_text().splitlines()]
    complete = sum(t["state"] == "COMPLETE" for t in done)
    monkeypatch.setattr(ExampleStore, "put", logging_put(ExampleStore.put, str(stored)))
    monkeypatch.setenv("FITNESS_LOG", str(fitness))
    monkeypatch.chdir(folder)  # the task's data files are relative to it
    result = CliRunner().invoke(cli, ["run", *args(complete + 2)])
    assert result.exit_code == 0, result.output
    done = [json.loads(line) for line in trials.read_text().splitlines()]
    assert sum(t["state"] == "COMPLETE" for t in done) == complete + 2
    rows = [tuple(json.loads(line)) for line in stored.read_text().splitlines()]
    assert len(rows) > len(first) and {r[1] for r in rows}  # the resume scored its new trials
    assert not [r for r, n in Counter(rows).items() if n > 1]
    if kind in ("judge", "endpoint"):  # every trial scored, resumed or not, reports its count of unread replies
        name = "judge:" + ("openai:tiny-judge" if kind == "endpoint" else judge_model.name)
        assert all(t["unparsed"][name][1] > 0 for t in done
                   if t["state"] == "COMPLETE" and t["reused_from"] is None)
    if kind == "python":
        calls = [tuple(json.loads(line)) for line in fitness.read_text().splitlines()]
        interrupted = calls[before_resume - 1][0]  # the model of the first process's last call
        assert not [c for c, n in Counter(calls).items() if n > 1 and c[0] != interrupted]


@pytest.mark.slow
def test_a_repeated_config_carries_its_scores_and_unread_replies(folder, tiny_llama, judge_model):
    """Four configs and eight trials: the repeats reuse the first trial's value, and carry its scores and its
    count of judge replies that gave no rating, as the trial that scored it does."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import cli

    text = run_recipe_text(tiny_llama, interrupt_objective("judge", folder, Path(), judge_model))
    path = folder / "recipe.yml"
    path.write_text(text.replace("{search: [0.0, 1.0]}", "{choice: [0.0, 1.0]}").replace("trials: 2", "trials: 8"))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(folder / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    trials = [json.loads(line) for line in (folder / "run" / "trials.jsonl").read_text().splitlines()]
    by_number = {t["number"]: t for t in trials}
    repeats = [t for t in trials if t["reused_from"] is not None]
    assert repeats and all(t["state"] == "COMPLETE" for t in trials)
    for t in repeats:
        first = by_number[t["reused_from"]]
        assert (t["scores"], t["unparsed"]) == (first["scores"], first["unparsed"]) and first["unparsed"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "reward", "judge", "pairwise", "endpoint"])
def test_every_objective_kind_searches_with_two_workers(folder, tiny_llama, reward_model, judge_model, kind, request):
    """--workers 2: the spawned worker builds its own scorers (a pairwise judge answers its reference there too)."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import cli
    from mergekit_evolve.study.storage import WORKER_KEY

    if kind == "endpoint":
        request.getfixturevalue("judge_server")
    objective = {
        "python": "{python: fitness.py:score, data: search.jsonl, heldout_data: heldout.jsonl}",
        "pairwise": f"{{judge_model: {judge_model}, prompts: search.jsonl, mode: pairwise, verdicts: [a, b], "
                    "generation: {max_new_tokens: 3}}",
    }.get(kind) or interrupt_objective(kind, folder, reward_model, judge_model)
    path = folder / "recipe.yml"
    path.write_text(run_recipe_text(tiny_llama, objective))
    run_dir = folder / "run"
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(run_dir), "--trials", "12", "--workers", "2",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    done = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    complete = [t for t in done if t["state"] == "COMPLETE"]
    assert len(complete) >= 12 and all(len(t["scores"]) == 1 for t in complete)
    study = optuna.load_study(study_name="recipe", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len({t.user_attrs[WORKER_KEY] for t in study.trials if t.state.is_finished()}) == 2  # both searched
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["winner"]["per_objective"]["heldout"]) == 1
