"""Requests built once and replayed give, per document, exactly what lm-eval's ``evaluate`` gives."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from mergekit_evolve.evaluate.requests import PreparedRequests
from mergekit_evolve.evaluate.suite import QuietHFLM

TASKS = {
    # several instances per document (one per choice)
    "tiny_choice": "output_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\ndoc_to_choice: \"{{choices}}\"\n"
    "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    # generation with two filter pipelines
    "tiny_generate": "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
    "generation_kwargs: {until: ['='], max_gen_toks: 4, do_sample: false}\n"
    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    "filter_list:\n  - name: whole\n    filter: [{function: take_first}]\n"
    "  - name: first_letter\n    filter: [{function: regex, regex_pattern: '([a-f])'}, {function: take_first}]\n",
    "tiny_loglik": "output_type: loglikelihood\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
    "metric_list:\n  - metric: acc\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[Path, dict]:
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    with open(folder / "data.jsonl", "w") as fp:
        for _ in range(12):
            s = "".join(rng.choice("abcdef") for _ in range(3))
            fp.write(json.dumps({"prompt": f"cp:{s}=", "answer": s, "choices": [s, s[::-1], "abc"], "label": 0}) + "\n")
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
            "test_split: test\n" + body
        )
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    with contextlib.chdir(folder):
        loaded = {name: get_task_dict([name], manager)[name] for name in TASKS}
    return folder, loaded


def lm_for(tiny_llama, seed: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[1])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama[1])
    return QuietHFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=8, device="cpu")


def lm_eval_rows(lm, tasks: dict, wanted: dict[str, list[int]]) -> dict[str, dict[int, dict]]:
    from lm_eval.evaluator import evaluate

    out = evaluate(lm, tasks, samples=wanted, bootstrap_iters=0, log_samples=True)
    rows: dict[str, dict[int, dict]] = {}
    for name in wanted:
        for sample in out["samples"][name]:
            row = rows.setdefault(name, {}).setdefault(sample["doc_id"], {})
            row.update({f"{m},{sample['filter']}": sample[m] for m in sample["metrics"]})
    return rows


def test_replayed_requests_equal_lm_eval_on_every_request_type(tasks, tiny_llama):
    _, loaded = tasks
    prepared = PreparedRequests(apply_chat_template=False)
    first = {"tiny_choice": [0, 3, 5, 7], "tiny_generate": [1, 2, 9], "tiny_loglik": [0, 4, 11]}
    # overlapping and new documents on a second model: built ones are replayed, new ones built
    second = {"tiny_choice": [3, 7, 8], "tiny_generate": [9, 10, 2], "tiny_loglik": [11, 6]}
    results = []
    for seed, wanted in ((0, first), (1, second)):
        lm = lm_for(tiny_llama, seed)
        ours = prepared.run(lm, loaded, wanted)
        results.append(ours)
        theirs = lm_eval_rows(lm, loaded, {name: sorted(ids) for name, ids in wanted.items()})
        assert ours == theirs
        assert set(ours["tiny_generate"][9]) == {"exact_match,whole", "exact_match,first_letter"}
    # replay on other weights changes the answers (the responses are not stale)
    lm = lm_for(tiny_llama, 2)
    again = prepared.run(lm, loaded, first)
    assert again == lm_eval_rows(lm, loaded, first)
    assert again["tiny_loglik"] != results[0]["tiny_loglik"]


@pytest.mark.parametrize("logits_cache", [True, False])
def test_batched_loglikelihood_equals_hflm_bit_for_bit(tiny_llama, logits_cache):
    from lm_eval.models.huggingface import HFLM

    from mergekit_evolve.evaluate import loglikelihood

    lm = lm_for(tiny_llama, 0)
    lm.logits_cache = logits_cache
    vocab = lm.model.config.vocab_size
    rng = random.Random(1)
    requests = []
    for i in range(40):
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        for _ in range(rng.choice([1, 1, 3])):  # several one-token choices share a context: grouped when cached
            continuation = [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 2, 5]))]
            requests.append(((f"c{i}", str(continuation)), context, continuation))
    requests.append((("long", "x"), list(range(vocab)) * 2, [1, 2]))  # longer than the model: truncated
    requests.append(requests[3])  # a repeat
    # the model's own greedy continuation, so that some greedy checks pass
    context = requests[0][1]
    with torch.no_grad():
        greedy = int(lm.model(torch.tensor([context])).logits[0, -1].argmax())
    requests.append((("greedy", ""), context, [greedy]))

    assert loglikelihood.applies(lm, None)
    ours = loglikelihood.loglikelihood_tokens(lm, requests)
    theirs = HFLM._loglikelihood_tokens(lm, requests)
    assert ours == theirs  # floats compared exactly
    assert any(is_greedy for _, is_greedy in ours) and not all(is_greedy for _, is_greedy in ours)
