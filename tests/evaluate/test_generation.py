"""The greedy decoding loop gives HFLM's generate_until strings, request for request."""

import random

import pytest
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mergekit_evolve.evaluate import generation
from mergekit_evolve.evaluate.suite import QuietHFLM


@pytest.fixture(scope="module")
def lms(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama[1]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama[1])
    return [cls(pretrained=model, tokenizer=tokenizer, batch_size=4) for cls in (HFLM, QuietHFLM)]


def requests(gen_kwargs_list):
    rng = random.Random(0)
    out = []
    for i in range(22):  # 6 batches of 4, the last one short; prompts of different lengths (padding)
        prompt = "".join(rng.choice("abcdef0123 :=") for _ in range(rng.randint(2, 14)))
        out.append(Instance("generate_until", {}, (prompt, dict(gen_kwargs_list[i % len(gen_kwargs_list)])), i))
    return out


@pytest.mark.parametrize("gen_kwargs", [
    [{"until": ["a"], "max_gen_toks": 12, "do_sample": False}],
    [{"until": ["1", "b"], "max_gen_toks": 5}, {"until": ["\n"], "max_gen_toks": 3, "temperature": 0.0}],
    [{"until": ["zz"], "max_gen_toks": 16}],  # a two-character stop that rarely appears: most run to the limit
])
def test_greedy_loop_equals_hflm(lms, gen_kwargs):
    hflm, quiet = lms
    reqs = requests(gen_kwargs)
    assert generation.applies(quiet, reqs)
    expected = hflm.generate_until(reqs, disable_tqdm=True)
    got = quiet.generate_until(reqs)
    assert got == expected
    assert any(got) and len(set(got)) > 3  # the model did generate, differently per prompt


def test_eos_ends_a_sequence(lms):
    hflm, quiet = lms
    eos = quiet.model.generation_config.eos_token_id
    # make the end-of-sequence token the greedy choice after one particular character
    model = quiet.model
    original = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[eos] = model.lm_head.weight.data[eos] + 5 * model.lm_head.weight.data.std()
        reqs = requests([{"until": ["zz"], "max_gen_toks": 10}])
        got = quiet.generate_until(reqs)
        assert got == hflm.generate_until(reqs, disable_tqdm=True)
        # some sequences end at once, some midway (the character tokenizer decodes with spaces)
        assert "" in got and any(0 < len(t.split()) < 10 for t in got)
    finally:
        model.lm_head.weight.data = original


def test_sampling_stays_on_hflm(lms):
    _, quiet = lms
    assert not generation.applies(quiet, requests([{"until": ["a"], "do_sample": True, "temperature": 0.7}]))
