"""A judge behind an OpenAI-compatible endpoint (``judge_model: openai:MODEL``), against a local server
the tests start (tests/openai_server.py), serving the same tiny judge a local ``judge_model`` reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_evolve.evaluate.example_objectives import ObjectiveError, TaskSetupError
from tests.evaluate.test_example_objectives import evaluator_for, write_jsonl
from tests.openai_server import serving

RUBRIC = "{prompt}={answer}:"


@pytest.fixture()
def folder(tmp_path) -> Path:
    write_jsonl(tmp_path / "search.jsonl", [{"prompt": f"{i}:"} for i in range(8)])
    return tmp_path


def judge(judge_model: str, **extra) -> dict:
    return {"judge_model": judge_model, "prompts": "search.jsonl", "rubric": RUBRIC,
            "ratings": [str(r) for r in range(10)], "pattern": "^([0-9])", "generation": {"max_new_tokens": 3},
            "judge_generation": {"max_new_tokens": 4}, **extra}


def test_an_endpoint_judge_scores_as_the_same_model_judging_locally(folder, tiny_llama, judge_model, monkeypatch):
    with serving(judge_model, key="sk-test") as server:
        monkeypatch.setenv("JUDGE_URL", server.url)
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        remote = judge("openai:tiny-judge", endpoint={"url_env": "JUDGE_URL", "key_env": "JUDGE_KEY", "concurrency": 3})
        local = judge(str(judge_model), scoring="parse", name="local")
        evaluator, model = evaluator_for({"objectives": [remote, local]}, folder, tiny_llama)
        for scorer in evaluator.suite.scorers.values():
            scorer.check()
        scores = evaluator.score(model, "search", digest="d")
        assert server.completions == 8  # one reply per prompt, asked three at a time
    assert scores.values["judge:openai:tiny-judge"] == scores.values["local"]
    assert scores.unparsed["judge:openai:tiny-judge"] == scores.unparsed["local"]
    assert 0 < scores.unparsed["local"][0] < 8  # both paths taken: read and unread replies


def test_rate_limits_and_server_errors_are_tried_again_and_other_errors_fail_with_the_servers_words(
        folder, tiny_llama, judge_model, monkeypatch):
    from mergekit_evolve.evaluate.judge_endpoint import Endpoint
    from mergekit_evolve.recipe.evolve_settings import EndpointSettings, GenerationSettings

    with serving(judge_model, key="sk-test") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setattr("time.sleep", lambda seconds: None)
        endpoint = Endpoint("openai:tiny-judge", EndpointSettings(retries=2))
        greedy = GenerationSettings(max_new_tokens=2)
        server.fail_next = [(429, "Rate limit reached"), (503, "overloaded")]
        assert endpoint.replies(["ab="], [0], greedy)[0] and server.completions == 1  # the third try
        server.fail_next = [(500, "boom")] * 3
        with pytest.raises(ObjectiveError, match=r"HTTP 500: boom \(tried 3 times\)"):
            endpoint.replies(["ab="], [0], greedy)
        server.fail_next = [(400, "max_tokens is too large")]
        with pytest.raises(ObjectiveError) as error:
            endpoint.replies(["ab="], [0], greedy)
        assert str(error.value) == (f"judge openai:tiny-judge: POST {server.url}/chat/completions: "
                                    "HTTP 400: max_tokens is too large")  # not tried again
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with pytest.raises(ObjectiveError, match="HTTP 401: Incorrect API key provided$") as error:
            endpoint.replies(["ab="], [0], greedy)
        assert "sk-wrong" not in str(error.value)


def test_what_is_wrong_with_an_endpoint_is_found_before_the_search(folder, tiny_llama, judge_model, monkeypatch):
    from mergekit_evolve.evaluate.judge import JudgeScorer
    from mergekit_evolve.recipe.evolve_settings import JudgeObjective

    def check(model: str = "openai:tiny-judge") -> str:
        scorer = JudgeScorer(JudgeObjective.model_validate(judge(model)), folder, False)
        with pytest.raises(TaskSetupError) as error:
            scorer.check()
        assert error.value.field == "judge_model"
        return str(error.value)

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "set OPENAI_BASE_URL (your server's URL" in check()
    with serving(judge_model, key="sk-test") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        assert check().endswith(f"GET {server.url}/models: HTTP 401: Incorrect API key provided")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        assert check("openai:gpt-4o") == (f"judge_model: openai:gpt-4o: {server.url} serves no model 'gpt-4o' "
                                          "(it serves: tiny-judge)")
        url = server.url
    assert "Connection refused" in check()  # the server is gone
    assert url in check()


@pytest.mark.parametrize(("change", "message"), [
    ({"scoring": "expected"}, "a judge behind an endpoint is scored by its reply"),
    ({"judge_model": "judges/tiny", "endpoint": {}}, "endpoint belongs to a judge behind an endpoint"),
    ({"endpoint": {"concurrency": 0}}, "greater than or equal to 1"),
])
def test_endpoint_settings_that_cannot_work_are_refused(change, message):
    from pydantic import ValidationError

    from mergekit_evolve.recipe.evolve_settings import JudgeObjective

    with pytest.raises(ValidationError, match=message):
        JudgeObjective.model_validate({**judge("openai:tiny-judge"), **change})
