"""Pins what compat/lm_eval.py relies on in the installed lm-eval: an upgrade that moves one fails here."""

from importlib.metadata import version

import lm_eval.utils
import torch
from lm_eval.models.huggingface import HFLM
from packaging.version import Version

from mergekit_evolve.compat import lm_eval as compat


def test_version_is_the_pinned_range():
    assert Version("0.4.8") <= Version(version("lm_eval")) < Version("0.5")


def test_compiled_templates_render_the_same_and_are_restored():
    template, doc = "Q: {{question}} A:", {"question": "2+2?"}
    plain = lm_eval.utils.apply_template(template, doc)
    original = lm_eval.utils.apply_template
    with compat.compiled_templates():
        assert lm_eval.utils.apply_template is not original
        assert lm_eval.utils.apply_template(template, doc) == plain
    assert lm_eval.utils.apply_template is original


def test_task_instances_are_what_filters_read():
    class Task:
        @property
        def instances(self):
            return self._instances

    task = Task()
    compat.set_task_instances(task, [1, 2])
    assert task.instances == [1, 2]


def test_hooks_route_hflms_private_steps(tiny_llama):
    import transformers

    base, _, _ = tiny_llama
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    calls = []

    class Spy(compat.HookedHFLM):
        def encode_pair(self, context, continuation):
            calls.append("encode")
            return super().encode_pair(context, continuation)

        def loglikelihood_tokens(self, requests, override_bs=None):
            calls.append("tokens")
            return super().loglikelihood_tokens(requests, override_bs)

    lm = Spy(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")

    class Request:
        args = ("ab", "c")

    assert lm.loglikelihood([Request()], disable_tqdm=True) == plain.loglikelihood([Request()], disable_tqdm=True)
    assert calls == ["encode", "tokens"]
    batch = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm.model_call(batch), plain._model_call(batch))
